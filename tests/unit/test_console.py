"""The terminal console: progress lines redraw one bar in place; every other line, and every line
off a terminal, is printed as it is."""

from __future__ import annotations

import io

from ft_appliance.console import Console, bar


def test_a_terminal_gets_one_bar_redrawn_and_other_lines_below_it() -> None:
    out = io.StringIO()
    console = Console(out, tty=True)
    console("[ft] start: sft/lora")
    console("[ft] step 5/10 (50%)  loss 1.0")
    console("[ft] step 10/10 (100%)  loss 0.5")
    console("[ft] finished: 10/10 steps")
    text = out.getvalue()
    assert text.startswith("[ft] start: sft/lora\n\r[############............] step 5/10 (50%)  loss 1.0")
    assert "\r[########################] step 10/10 (100%)  loss 0.5\n[ft] finished: 10/10 steps\n" in text


def test_a_pipe_gets_every_line_unchanged() -> None:
    out = io.StringIO()
    console = Console(out, tty=False)
    console("[ft] step 5/10 (50%)  loss 1.0")
    console("[ft] finished")
    assert out.getvalue() == "[ft] step 5/10 (50%)  loss 1.0\n[ft] finished\n"
    assert bar(0, 0, 4) == "[....]" and bar(3, 4, 4) == "[###.]"
