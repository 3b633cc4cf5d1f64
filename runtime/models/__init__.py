"""Models the runtime can drive: protocol.py (the contract), tiny.py (CPU test model), cost.py
(the simulator's step-time model)."""
