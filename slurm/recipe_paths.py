"""Print the filesystem paths a recipe names, one `key<TAB>value` per line, for slurm/launch.sh.

    python3 slurm/recipe_paths.py RECIPE.yaml [section.key=value ...]

Runs on the batch node, outside the container (needs only PyYAML and megavlm's config
loader, which follows `base:` chains and applies overrides as the trainer does). launch.sh
checks each path against the container mounts and finds checkpoint.save on the host.
"""

from __future__ import annotations

import sys

from megavlm.config.loader import load_config_data

# Keys that name files or directories; any other string value that starts with "/" is
# listed too, so a path key added later is still checked.
PATH_KEYS = ("checkpoint.save", "checkpoint.load", "checkpoint.pretrained", "logging.dir", "data.path",
             "data.tokenizer")


def paths(data: dict, prefix: str = "") -> list[tuple[str, str]]:
    found = []
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            found += paths(value, f"{dotted}.")
        elif isinstance(value, str) and (dotted in PATH_KEYS or value.startswith("/")):
            found.append((dotted, value))
    return found


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    for key, value in paths(load_config_data(sys.argv[1], sys.argv[2:])):
        print(f"{key}\t{value}")


if __name__ == "__main__":
    main()
