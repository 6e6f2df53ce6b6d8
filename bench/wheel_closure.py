"""Do the wheels carried to the GPU machine bring every requirement its image lacks?

    python3 bench/wheel_closure.py .whl bench/gpu_image_packages.txt

The GPU machine cannot reach a package index, so the suite installs its carried wheels with --no-deps
(bench/gpu_suite.sh). A declared requirement that neither the image (the list file) nor another carried
wheel provides can fail only there, at import, in the lent minutes. Found so: importlib_metadata 10 (a
requirement of diffusers) declares lazy-importer on Python < 3.15, which the image lacks, and without it
`import importlib_metadata` raises ModuleNotFoundError on the image's Python 3.12 (checked here with
Python 3.12.1; diffusers itself imports it only on Python < 3.8, so the suite's imports did not break).
This reads each wheel's METADATA, keeps the requirements whose markers hold on the image's Python (3.12,
Linux x86-64, no extras), and exits 1 naming any that is missing or whose version the image or the
wheels do not meet, or two wheels of one package (pip refuses to install both).
"""

import argparse
import email.parser
import os
import re
import sys
import zipfile

try:
    from packaging.requirements import Requirement
    from packaging.version import Version
except ImportError:  # a bare python3 with pip, as `fetch` runs under
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.version import Version

# The GPU image's interpreter (bench/gpu_image_packages.txt): what requirement markers are evaluated against.
IMAGE_ENV = {
    "python_version": "3.12",
    "python_full_version": "3.12.3",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
    "extra": "",
}


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_image(path: str) -> dict[str, str | None]:
    """The image's packages: name -> version, or None where the list gives none."""
    packages = {}
    for line in open(path):
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            packages[normalize(name)] = version.strip() or None
    return packages


def read_wheel(path: str) -> tuple[str, str, list[str]]:
    """A wheel's (name, version, Requires-Dist lines), from its METADATA."""
    with zipfile.ZipFile(path) as wheel:
        meta = next((n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")), None)
        if meta is None:
            raise SystemExit(f"{path}: no .dist-info/METADATA; is it a wheel?")
        message = email.parser.Parser().parsestr(wheel.read(meta).decode("utf-8"))
    return normalize(message["Name"]), message["Version"], message.get_all("Requires-Dist") or []


def missing(wheel_dir: str, image: dict[str, str | None]) -> list[str]:
    """One line per requirement of the wheels in `wheel_dir` that the image plus the wheels leave unmet."""
    wheels, problems = {}, []
    for f in sorted(os.listdir(wheel_dir)):
        if f.endswith(".whl"):
            name, version, requires = read_wheel(os.path.join(wheel_dir, f))
            if name in wheels:  # pip install of both stops the whole install (the device tool's README)
                problems.append(f"{f} and {wheels[name][0]}: two versions of {name}; delete one")
            wheels[name] = (f, version, requires)
    have = image | {name: version for name, (_, version, _) in wheels.items()}  # carried wheels win
    for f, _, requires in wheels.values():
        for line in requires:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate(IMAGE_ENV):
                continue
            got = normalize(req.name)
            if got not in have:
                problems.append(f"{f} needs {line}: not in the image, not carried")
            elif have[got] and req.specifier and Version(have[got]) not in req.specifier:
                problems.append(f"{f} needs {line}: the GPU machine would have {req.name} {have[got]}")
    return problems


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("wheel_dir")
    parser.add_argument("image_list")
    args = parser.parse_args()
    problems = missing(args.wheel_dir, read_image(args.image_list))
    for p in problems:
        print(p)
    if problems:
        print("Fetch the missing ones too (bench/gpu_suite.sh fetch), or pin a version that needs none.")
        sys.exit(1)
    print(f"every requirement of {args.wheel_dir}/*.whl is in the image or carried")


if __name__ == "__main__":
    main()
