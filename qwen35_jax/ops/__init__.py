"""Pure functions with no parameters: norms, rope, attention, conv, the gated delta rule, MoE dispatch."""
