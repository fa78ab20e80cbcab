"""``python -m moeconv``: the command line, for environments without the ``moeconv`` script on PATH."""

from moeconv.cli import main

if __name__ == "__main__":
    main()
