"""Not core: the toy task, tiny models, the study, the demo and multi-stage recipes (they may import the core; the core never imports them)."""
