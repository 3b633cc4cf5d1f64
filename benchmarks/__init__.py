"""kvpager.benchmarks: the code behind `kvpager bench {tables,scheduler,kernel}`. Each module
exposes `add_arguments(parser)` and `run(args) -> int` and prints figures; none is pass/fail."""
