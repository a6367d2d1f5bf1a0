"""The GDB remote stub (`--gdb tcp:HOST:PORT`): packets, registers, the guest as a GDB target, the server."""
