"""echo-scp: a DICOM Verification (C-ECHO) service and probe client.

Kept import-free on purpose: the probe client (``echo_scp.scu``) is started as an
exec probe every few seconds, so importing the package must not pull in
pynetdicom, pydicom or pydantic.
"""

__version__ = "0.1.0"
