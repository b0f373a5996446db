"""Build of exml_fast._C: the CPU kernels always, the CUDA kernels when possible.

Switches (environment variables):
  EXML_FAST_NO_CUDA=1     build the CPU kernels only.
  EXML_FAST_FORCE_CUDA=1  fail unless the CUDA kernels are built.
  TORCH_CUDA_ARCH_LIST    CUDA archs, e.g. "9.0" or "8.0;9.0+PTX"; defaults to the
                          visible GPU's arch, or to DEFAULT_ARCHS when none is visible.
  MAX_JOBS                parallel compile jobs (ninja).
  EXML_FAST_SANITIZE=1    build with AddressSanitizer and UndefinedBehaviorSanitizer
                          (-O1 -g; `make sanitize` builds it apart and runs the op tests).
  CUDA_HOME               CUDA toolkit root; defaults to /usr/local/cuda when unset.

Install with `pip install --no-build-isolation -e .`: the extension compiles
against the torch already installed in the environment.
"""

from __future__ import annotations

import glob
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;8.6;9.0+PTX"


def _metadata_only() -> bool:
    """True when this run only writes metadata (egg_info, dist_info).

    pip runs this file in separate processes: for the build requirements
    (egg_info), for the metadata (dist_info) and for the build itself; the
    build report belongs to the last alone, so that it is printed once.
    """
    command = next((a for a in sys.argv[1:] if not a.startswith("-")), None)
    return command in ("egg_info", "dist_info")


QUIET = _metadata_only()


def log(msg: str) -> None:
    if not QUIET:
        print(f"[exml_fast build] {msg}", flush=True)


# torch.utils.cpp_extension reads CUDA_HOME when it is imported, and would
# otherwise infer it from `which nvcc`, which misleads when nvcc sits outside
# the toolkit root (e.g. /usr/local/bin/nvcc with the toolkit in /usr/local/cuda).
if not os.environ.get("CUDA_HOME") and not os.environ.get("CUDA_PATH"):
    if os.path.isdir("/usr/local/cuda"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def decide_cuda() -> tuple[bool, str]:
    """Returns (build CUDA kernels?, why)."""
    force, never = env_flag("EXML_FAST_FORCE_CUDA"), env_flag("EXML_FAST_NO_CUDA")
    if force and never:
        sys.exit("EXML_FAST_FORCE_CUDA=1 and EXML_FAST_NO_CUDA=1 contradict each other")
    if never:
        return False, "EXML_FAST_NO_CUDA=1"
    reason = None
    if torch.version.cuda is None:
        reason = f"the installed torch {torch.__version__} is a CPU-only build"
    elif cpp_extension.CUDA_HOME is None:
        reason = "no CUDA toolkit found (set CUDA_HOME)"
    elif not os.path.exists(os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")):
        reason = f"no nvcc in {cpp_extension.CUDA_HOME}/bin"
    if reason is not None:
        if force:
            sys.exit(f"EXML_FAST_FORCE_CUDA=1 but CUDA kernels cannot be built: {reason}")
        return False, reason
    return True, (
        f"torch {torch.__version__} is a CUDA {torch.version.cuda} build and the toolkit "
        f"is at {cpp_extension.CUDA_HOME}"
    )


def nvidia_wheel_dirs() -> tuple[list[str], list[str]]:
    """Header and library dirs of the `nvidia` pip wheels that CUDA torch installs.

    A system toolkit may lack headers torch's CUDA headers include (cusparse.h,
    cublas_v2.h); the wheels ship them. They go after the toolkit's own dirs.
    """
    incs, libs = [], []
    for site in sys.path:
        base = os.path.join(site, "nvidia")
        if not os.path.isdir(base):
            continue
        # nvidia/cu13/{include,lib}: the CUDA runtime-library wheels.
        for sub in sorted(os.listdir(base)):
            if re.fullmatch(r"cu\d+", sub):
                incs += glob.glob(os.path.join(base, sub, "include"))
                libs += glob.glob(os.path.join(base, sub, "lib"))
        break
    return incs, libs


def links_shared_libstdcxx(cxx: str) -> bool | None:
    """Whether `cxx -shared` makes libraries that load the shared libstdc++ (True) or carry a
    static copy of it (False); None where that cannot be told (no such compiler, no ldd)."""
    with tempfile.TemporaryDirectory() as tmp:
        src, lib = os.path.join(tmp, "probe.cpp"), os.path.join(tmp, "probe.so")
        with open(src, "w") as f:
            f.write("#include <sstream>\n"
                    "int probe(long n) { std::ostringstream s; s << n; return int(s.str().size()); }\n")
        try:
            subprocess.run([*shlex.split(cxx), "-shared", "-fPIC", src, "-o", lib], capture_output=True,
                           check=True, timeout=120)
            deps = subprocess.run(["ldd", lib], capture_output=True, text=True, check=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            return None
    return "libstdc++" in deps


def check_cxx_runtime() -> None:
    """Refuse a $CXX that links libstdc++ statically into shared libraries.

    The extension would then carry a second C++ runtime whose iostreams are never set up, and
    the first error message with a number in it (any bad argument) crashes the process, as the
    /opt/gcc wrappers named by the GPU machines' CC/CXX did. Such a compiler is replaced by the
    g++ and gcc on PATH when those link the shared runtime; the build stops when none does.
    """
    if platform.system() != "Linux":
        return
    cxx = os.environ.get("CXX", "c++")
    if links_shared_libstdcxx(cxx) is not False:
        return
    for cand_cxx, cand_cc in (("g++", "gcc"), ("c++", "cc")):
        path, cc = shutil.which(cand_cxx), shutil.which(cand_cc)
        if path and cc and links_shared_libstdcxx(path):
            log(f"CXX={cxx} links libstdc++ statically into shared libraries (a second C++ runtime in the "
                f"extension crashes on its first error message): building with CXX={path} CC={cc} instead")
            os.environ["CXX"], os.environ["CC"] = path, cc
            return
    sys.exit(f"exml_fast: the C++ compiler {cxx} links libstdc++ statically into shared libraries, and no "
             "g++ or c++ on PATH links the shared one: the extension would crash on its first error message. "
             "Set CXX and CC to a compiler that links the shared libstdc++.")


def compiler_version() -> str:
    cxx = os.environ.get("CXX", "c++")
    try:
        out = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True)
        return out.stdout.splitlines()[0]
    except (OSError, subprocess.CalledProcessError):
        return cxx


def write_build_info(with_cuda: bool, archs: str) -> str:
    """Writes the generated header module.cpp includes; returns its directory."""
    gen_dir = os.path.join(ROOT, "build", "generated")
    os.makedirs(gen_dir, exist_ok=True)
    lines = [
        "#pragma once",
        f'#define EXML_FAST_TORCH_VERSION "{torch.__version__}"',
        f'#define EXML_FAST_CXX_COMPILER "{compiler_version()}"',
    ]
    if with_cuda:
        lines += [
            "#define EXML_FAST_WITH_CUDA 1",
            f'#define EXML_FAST_CUDA_VERSION "{torch.version.cuda}"',
            f'#define EXML_FAST_CUDA_ARCHS "{archs}"',
        ]
    text = "\n".join(lines) + "\n"
    path = os.path.join(gen_dir, "exml_fast_build_info.h")
    # Rewrite only on change so ninja does not rebuild module.cpp every time.
    old = open(path).read() if os.path.exists(path) else None
    if old != text:
        with open(path, "w") as f:
            f.write(text)
    return gen_dir


def make_extension():
    if not QUIET:
        check_cxx_runtime()
    with_cuda, why = decide_cuda()
    cpu_sources = sorted(glob.glob("csrc/ops/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    sources = ["csrc/module.cpp"] + cpu_sources
    log(f"torch {torch.__version__} (CUDA {torch.version.cuda}), python {platform.python_version()}")
    log(f"CPU kernels: {', '.join(cpu_sources)}")
    archs = ""
    if with_cuda:
        cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
        sources += cuda_sources
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
        if not archs:
            if torch.cuda.is_available():
                cap = torch.cuda.get_device_capability()
                archs = f"{cap[0]}.{cap[1]}"
                log(f"TORCH_CUDA_ARCH_LIST unset: using the visible GPU's arch {archs}")
            else:
                archs = DEFAULT_ARCHS
                log(f"TORCH_CUDA_ARCH_LIST unset and no GPU visible: default {archs}")
            os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        log(f"CUDA kernels: {', '.join(cuda_sources)} for archs {archs} because {why}")
    else:
        log(f"CUDA kernels: skipped because {why}")
    log(f"MAX_JOBS={os.environ.get('MAX_JOBS', '(ninja default)')}")

    gen_dir = write_build_info(with_cuda, archs)
    include_dirs = [os.path.join(ROOT, "csrc", "include"), gen_dir]
    library_dirs = []
    # -fopenmp: at::parallel_for is an inline template whose `omp parallel`
    # is compiled in our own sources; without it every CPU kernel runs on one
    # thread. The OpenMP runtime is torch's own (same soname, already loaded).
    # -fno-trapping-math (as torch's own build): lets GCC if-convert selects between branch-free results
    # one of which divides (tanh_common.h); without it such loops do not vectorise. No value changes.
    cxx_flags = ["-O3", "-std=c++20", "-fopenmp", "-fno-trapping-math", "-Wno-unknown-pragmas"]
    ext_kwargs = {"extra_link_args": ["-fopenmp"]}
    if env_flag("EXML_FAST_SANITIZE"):
        # The sanitizers find more with less optimisation; errors abort, so a test run fails on the first.
        san = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g"]
        cxx_flags = [f for f in cxx_flags if f != "-O3"] + ["-O1", *san]
        ext_kwargs["extra_link_args"] += ["-fsanitize=address,undefined"]
        log("EXML_FAST_SANITIZE=1: AddressSanitizer + UndefinedBehaviorSanitizer, -O1")
    if with_cuda:
        incs, libs = nvidia_wheel_dirs()
        if incs:
            log(f"nvidia wheel headers appended: {', '.join(incs)}")
        include_dirs += incs
        library_dirs += libs
        nvcc_flags = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"]
        ext_kwargs["extra_compile_args"] = {"cxx": cxx_flags, "nvcc": nvcc_flags}
        ext_kwargs["define_macros"] = [("EXML_FAST_WITH_CUDA", "1")]
        ext_cls = cpp_extension.CUDAExtension
    else:
        ext_kwargs["extra_compile_args"] = {"cxx": cxx_flags}
        ext_cls = cpp_extension.CppExtension
    return ext_cls(
        name="exml_fast._C",
        sources=sources,
        include_dirs=include_dirs,
        library_dirs=library_dirs,
        **ext_kwargs,
    )


setup(
    packages=find_packages(include=["exml_fast", "exml_fast.*"]),
    ext_modules=[make_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
