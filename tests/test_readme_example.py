"""README's Python example runs as written, and sends what it says it sends."""
import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_readme_split_example_trains_and_puts_eight_channels_on_the_wire(capsys):
    text = README.read_text()
    block = re.search(r"In your own training loop.*?```python\n(.*?)```", text, re.S)
    assert block, "README lost its splitprune.split example"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        exec(compile(block.group(1), str(README), "exec"), {"__name__": "readme"})
    finally:
        torch.set_num_threads(threads)
    sent = int(re.search(r"(\d+) B up instead of 32,768 B of fp32", capsys.readouterr().out).group(1))
    assert 8 * 8 * 8 * 2 <= sent < 8 * 8 * 8 * 2 + 64  # 8 channels of 8 x 8 in fp16, and a small header
