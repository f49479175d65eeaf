"""Hatch build hook: put the `tune ls`/`tune cp` registration .pth into editable installs too.

Hatchling's `force-include` only applies to regular wheels; editable wheels need it in
``force_include_editable``.
"""

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

_PTH = "torchtune_prefopt/_assets/torchtune_prefopt_registry.pth"


class CustomBuildHook(BuildHookInterface):
    def initialize(self, version, build_data):
        if version == "editable":
            build_data["force_include_editable"][_PTH] = "torchtune_prefopt_registry.pth"
