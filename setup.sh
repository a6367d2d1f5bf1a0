#!/usr/bin/env bash
# Sets up pyhv on a fresh machine and runs the demo guest: install the project
# (builds the cffi KVM extension), build the example guest from source, boot it.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m pip install -q -e '.[test]' --config-settings editable_mode=compat
make -s -C examples
hvctl run --boot raw64 --kernel examples/build/hello.bin
