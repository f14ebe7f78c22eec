"""vprkit: the support code of the VPR training suite (CLI, tables, pairs, cache, evaluation,
logs, checkpoints). trainable_vpr, the training core package, and the scripts build on it; nothing here
imports them. See docs/DESIGN.md for where each idea lives."""
