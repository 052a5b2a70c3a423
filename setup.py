"""The one build step pyproject.toml cannot declare: models.toml, the built-in model registry, lies
at the repository's top level and the wheel carries it inside the package, as edge_llm/models.toml
(where edge_llm/registry.py looks first). An editable install copies nothing: the registry reads the
top-level file beside the package. The sdist carries the top-level file (MANIFEST.in), so a wheel
built from it has the registry too."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

REGISTRY = "models.toml"


class BuildPyWithRegistry(build_py):
    def run(self) -> None:
        super().run()
        if not self.editable_mode:
            self.copy_file(REGISTRY, str(Path(self.build_lib, "edge_llm", REGISTRY)))

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        outputs = super().get_outputs(include_bytecode)
        return outputs if self.editable_mode else [*outputs, str(Path(self.build_lib, "edge_llm", REGISTRY))]


setup(cmdclass={"build_py": BuildPyWithRegistry})
