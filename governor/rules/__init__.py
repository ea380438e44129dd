"""Pure rules: snapshot + policy + previous state in, decisions + new state out.

No rule reads a clock, touches hardware, logs or counts: time comes from the
snapshot and every effect goes through :mod:`governor.actuator`.
"""
