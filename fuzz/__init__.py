"""The harness: operations, traces, targets, state machines, fuzzers and the campaign CLI."""
