"""Print the runtime dependencies of pyproject.toml pinned to their stated lower bounds (``a>=1.2`` -> ``a==1.2``)."""

import re
from pathlib import Path

import tomllib

project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
for requirement in project["dependencies"]:
    print(re.sub(r">=", "==", requirement.split(";")[0].split(",")[0].strip()))
