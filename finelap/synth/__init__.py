"""Synthetic sound-event-detection sets (FineLAP-100k style) and a built-in procedural sound bank.

`run_synthesis(SynthConfig(...))` or `finelap synth ...` (see finelap/synth/cli.py).
"""
