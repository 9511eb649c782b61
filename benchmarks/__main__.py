"""``make bench``: the CPU-scale suite (each experiment also has its own command)."""
import argparse
import sys

from . import federated, two_models


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--scale", default="cpu")
    p.add_argument("--out", default=None)
    p.add_argument("--data-root", default="")
    a = p.parse_args(argv)
    root = a.out or f"results/{a.scale}"
    extra = ["--data-root", a.data_root] if a.data_root else []
    two_models.main(["--scale", a.scale, "--out", f"{root}/two_models", *extra])
    federated.main(["--scale", a.scale, "--out", f"{root}/federated", *extra])


if __name__ == "__main__":
    sys.exit(main())
