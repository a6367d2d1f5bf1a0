#!/usr/bin/env bash
# Sets up pyhv on a fresh machine and runs the demo guest: install the project
# (builds the cffi KVM extension), fetch and build the Linux guest artefacts
# (cached in ${HV_ARTEFACTS:-/var/cache/pyhv}: minutes the first time, instant
# after), build the example guest from source, boot it.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m pip install -q -e '.[test]' --config-settings editable_mode=compat
# Bytecode now: hvctl run starts in ~100 ms only if it need not compile itself
# (and PYTHONDONTWRITEBYTECODE may be set, so it would compile every time).
python3 -m compileall -q -j 0 supervisor vcpu_worker devices proto >/dev/null
bash guests/fetch.sh
make -s -C examples
hvctl run --boot raw64 --kernel examples/build/hello.bin
