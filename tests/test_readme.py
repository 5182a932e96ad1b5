"""The README's Python examples run as written."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_blocks_run(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    for block in blocks:
        exec(compile(block, str(README), "exec"), {"__name__": "readme"})
    printed = capsys.readouterr().out
    assert printed.count(" SA ") == 5  # one line per candidate layer of the example UNet
    assert "torch.Size([2, 2])" in printed and "torch.Size([2, 8])" in printed
    assert "torch.Size([1, 4, 16, 16, 24])" in printed
    assert "torch.Size([1, 32, 32]) tensor([1.])" in printed
    assert "new_0" in printed
