"""The ``fastune`` command line: the group (``group.py``) and one module per family
of commands. A new command is a ``click.command`` in a module here, added below
with one ``main.add_command``.
"""

from fastune.cli import bench, hub, inference, train, workflow
from fastune.cli.group import main
from fastune.export.cli import export

main.add_command(train.train)
main.add_command(train.validate)
main.add_command(train.list_configs)
main.add_command(train.copy_config)
main.add_command(workflow.cat_config)
main.add_command(workflow.run)
main.add_command(workflow.plot)
main.add_command(bench.plan)
main.add_command(bench.bench)
main.add_command(hub.download)
main.add_command(hub.upload)
main.add_command(inference.generate)
main.add_command(inference.evaluate)
main.add_command(inference.quantize)
main.add_command(export)

__all__ = ["main"]
