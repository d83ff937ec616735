#!/bin/sh
# The runtime virtualenv, built one way for the image (the Dockerfile's builder
# stage) and for the benchmark (`make bench`): echo-scp from its wheel with its
# runtime dependencies, then no pip or setuptools, no test folders, and bytecode
# compiled without docstrings (python -m echo_scp.bytecode: asserts kept).
#
# usage: sh deploy/runtime-venv.sh PYTHON VENV [SOURCE]
# pip reads its options from the environment (PIP_NO_INDEX, PIP_FIND_LINKS, ...).
set -eu
python=$1
venv=$2
source=${3:-.}
wheels=$(mktemp -d)
trap 'rm -rf "$wheels"' EXIT
"$python" -m venv --clear "$venv"
"$venv/bin/pip" wheel --no-deps --wheel-dir "$wheels" "$source"
"$venv/bin/pip" install "$wheels"/echo_scp-*.whl
"$venv/bin/pip" uninstall --yes --quiet pip setuptools
find "$venv/lib" -depth -type d \( -name tests -o -name test_files \) -exec rm -rf {} +
"$venv/bin/python" -m echo_scp.bytecode "$venv/lib"
"$venv/bin/echo-scp" --version
