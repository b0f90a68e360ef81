"""`python -m ondevice`: the same CLI as the `ondevice` console script."""

from ondevice.cli import main

if __name__ == "__main__":
    main(prog_name="ondevice")
