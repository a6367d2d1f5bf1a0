"""`python -m pyhv.supervisor.cli`: hvctl without its launcher (how `hvctl supervisor --detach` starts the daemon)."""
from pyhv.supervisor.cli import main

main()
