"""The PC's legacy devices every guest has: 16550A COM1, i8042, CMOS RTC, and pyhv's debug page (pure register models)."""
