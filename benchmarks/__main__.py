from absl import app, flags

from benchmarks import cli

__doc__ = cli.__doc__  # absl's --help prints the main module's docstring and key flags

if __name__ == "__main__":
    cli.define_flags(flags.FLAGS)
    flags.adopt_module_key_flags(cli)
    app.run(cli.run_from_flags)
