"""`python -m stn ...` = `stn ...`."""

from stn.cli import app

if __name__ == "__main__":
    app(prog_name="stn")
