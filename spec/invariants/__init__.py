"""White-box invariants: predicates over the reference model's state, checked after every
step of the harness. Only this package reads reference state; the contracts do not."""
