"""The user docs name only what exists: configs, files, flags, and trainer commands that parse;
the flag reference is generated from the flags and current; the README stays a front page."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", REPO / "WORKSPACE.md", *sorted((REPO / "docs").glob("*.md"))]
# Flags of other programs the docs show (Beam's pipeline options after `--`, pip, TensorBoard).
FOREIGN_FLAGS = {"runner", "project", "region", "temp_location", "extra_package", "no-deps",
                 "logdir", "w", "helpfull", "flagfile", "verbosity", "v"}
# Placeholders the docs use for values a reader supplies.
PLACEHOLDERS = {"<config>": "omniglot_5w1s", "<dataset>": "omniglot", "<run>": "/tmp/run",
                "<records>": "/tmp/records", "<subset records>": "/tmp/records",
                "<name>": "omniglot_5w1s", "<base>": "omniglot_5w1s", "DIR": "/tmp/dir", "$HOME": "/tmp/home"}


def _text(path: Path) -> str:
  return path.read_text()


def _defined_flags() -> set[str]:
  """Every flag a program of this repository defines (absl or argparse), and --noX forms."""
  names = set()
  for path in [*REPO.glob("trainer/*.py"), *REPO.glob("tools/*.py"), *REPO.glob("bench/*.py"),
               *REPO.glob("rl/*.py")]:
    source = path.read_text()
    names |= set(re.findall(r"DEFINE_\w+\(\s*\"(\w+)\"", source))
    names |= set(re.findall(r"\(flags\.DEFINE_\w+,\s*\"(\w+)\"", source))
    names |= set(re.findall(r"add_argument\(\s*\"--([\w-]+)\"", source))
  return names | {"no" + n for n in names}


def test_every_config_and_file_the_docs_name_exists():
  missing = []
  for doc in DOCS:
    text = _text(doc)
    for name in re.findall(r"configs/([\w{},]+)\.cfg", text):
      for stem in re.sub(r"[{}]", "", name).split(","):
        if not (REPO / "configs" / f"{stem}.cfg").exists():
          missing.append(f"{doc.name}: configs/{stem}.cfg")
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):  # local Markdown links
      if not (doc.parent / target).exists():
        missing.append(f"{doc.name}: link {target}")
    for path in re.findall(r"`((?:tools|bench|trainer|pipeline|rl|tests)/[\w/]+\.py)`", text):
      if not (REPO / path).exists():
        missing.append(f"{doc.name}: {path}")
  assert not missing, missing


def test_every_flag_the_docs_name_is_defined():
  defined = _defined_flags() | FOREIGN_FLAGS
  unknown = set()
  for doc in DOCS:
    for name in re.findall(r"(?<![\w-])--([a-z][\w-]*)(?![\w/-])", _text(doc)):
      if name not in defined:
        unknown.add(f"{doc.name}: --{name}")
  assert not unknown, sorted(unknown)


def _trainer_commands() -> list[list[str]]:
  """The ``trainer.main`` command lines of the docs' code blocks and inline code, as argv."""
  commands = []
  for doc in DOCS:
    text = _text(doc).replace("\\\n", " ")
    blocks = re.findall(r"```[^\n]*\n(.*?)```", text, re.S) + re.findall(r"`([^`\n]+)`", text)
    for block in blocks:
      for line in block.splitlines():
        line = line.split("#", 1)[0]
        if line.startswith("--flagfile=configs/"):  # a table's command column
          line = "trainer.main " + line
        if "trainer.main" not in line or "--" not in line:
          continue
        for key, value in PLACEHOLDERS.items():
          line = line.replace(key, value)
        args = [a for a in shlex.split(line.split("trainer.main", 1)[1])
                if a.startswith("--") and "[" not in a and "{" not in a and "..." not in a]
        if any(a.startswith("--flagfile") for a in args) or len(args) > 1:
          commands.append(args)
  return commands


def test_every_trainer_command_in_the_docs_parses():
  commands = _trainer_commands()
  assert len(commands) >= 10, commands
  script = (
      "import json, sys\n"
      "from absl import flags\n"
      "from trainer import config\n"
      "bad = []\n"
      "for argv in json.loads(sys.argv[1]):\n"
      "  flags.FLAGS.unparse_flags()\n"
      "  try:\n"
      "    flags.FLAGS(['x', *argv])\n"
      "  except Exception as e:\n"
      "    bad.append((argv, str(e).splitlines()[0]))\n"
      "print(json.dumps(bad))\n")
  result = subprocess.run([sys.executable, "-c", script, json.dumps(commands)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert json.loads(result.stdout.splitlines()[-1]) == []


def test_the_flag_reference_is_current():
  result = subprocess.run([sys.executable, "tools/write_flags_doc.py", "--check"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, (result.stdout + result.stderr)[-2000:]
  text = (REPO / "docs" / "flags.md").read_text()
  assert "| `--max_kl` |" in text and "| `--inner_adapt` |" in text


def test_the_readme_is_a_front_page():
  readme = (REPO / "README.md").read_bytes()
  assert len(readme) <= 12_500, len(readme)
  text = readme.decode()
  for section in ("## Two commands", "## Results", "## What it offers", "## Documentation"):
    assert section in text, section
  history = re.findall(r"\b(?:sessions?|stretches|earlier measurements?|now fixed|issue \d+)\b",
                       " ".join(_text(d) for d in DOCS if d.name != "WORKSPACE.md"), re.I)
  assert not history, history
