"""Device models and the plumbing they share; they import only proto, start no processes, and reach KVM only through an IrqRouter."""
