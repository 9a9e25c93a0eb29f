"""The study command's pieces (study.py is the command): one idea per module, in layers: grid (what a study is made
of) and matching below spec (the spec read into its grid); status and running (the grid points' state, running them);
collecting, fits, comparison, teacher_gap, latency (what is computed from the finished runs); figures and report
(what is drawn and written); quoted (numbers quoted from results, checked against the result files)."""
