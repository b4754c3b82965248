"""The files stages hand to each other: URL lists, the gather journal, manifests, pack files,
checkpoints and the run folder. Each module owns its format's writer and reader."""
