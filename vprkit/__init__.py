"""vprkit: the support code of the VPR training suite, in wings: cli/ (the command-line shell:
errors, files, flags and their layers), tables/ (what scripts read, the pair rule), extraction/
(features and their cache, pooling, views), retrieval/ (evaluation, whitening, localization,
exports), logs/ (run logs, figures), routes/ (sequences over routes). trainable_vpr, the training
core package, and the scripts build on it; nothing here imports them. See docs/DESIGN.md."""
