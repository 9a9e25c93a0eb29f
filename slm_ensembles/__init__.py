"""The machinery under the scripts: run folders, teacher caches, files and processes, compute accounting, students,
losses, evaluation, distributed inference. Users run the top-level scripts; docs/layout.md draws the layers."""
