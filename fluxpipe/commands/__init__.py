"""Command front ends: the reference trainer's flags and TOML turned into the stages' typed configs."""
