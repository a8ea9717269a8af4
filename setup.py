"""Package layout that pyproject.toml cannot express: top-level folders under new names.

``components/`` and ``pipelines/`` (the layout kubeflow/pipelines-components uses) install
as ``qatflow_components`` and ``qatflow_pipelines``, so the compiled DAG is importable
wherever qatflow is installed, without claiming generic top-level package names.
"""

from setuptools import find_packages, setup

RENAMED = {"qatflow_components": "components", "qatflow_pipelines": "pipelines"}
# Component tests (components/<step>/tests) stay out of the wheel; their support code lives in
# tests/ and the repository's conftest.py.
TESTS = ["tests", "*.tests", "*.tests.*"]

packages = find_packages("src", include=["qatflow", "qatflow.*"], exclude=TESTS)
package_dir = {"": "src"}
for name, folder in RENAMED.items():
    for sub in ["", *find_packages(folder, exclude=TESTS)]:
        package = f"{name}.{sub}" if sub else name
        packages.append(package)
        package_dir[package] = f"{folder}/{sub.replace('.', '/')}".rstrip("/")

setup(packages=packages, package_dir=package_dir, exclude_package_data={"": ["tests/*"]})
