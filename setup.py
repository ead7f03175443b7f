"""Build the Cython kernels, with OpenMP when the compiler has it and serially when not.

CBN_MARCH selects the instruction set (default "native": the build is for this machine;
set CBN_MARCH="" for a portable build, or e.g. CBN_MARCH=x86-64-v3). CBN_OPENMP=0 builds
the serial kernels on purpose, as on a compiler without OpenMP.
"""
import os
import shlex
import tempfile
import textwrap
import warnings

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

OPENMP_PROBE = textwrap.dedent("""
    #include <omp.h>
    int main(void) { return omp_get_max_threads() > 0 ? 0 : 1; }
""")
PLAIN_PROBE = "int main(void) { return 0; }\n"


def compiles_and_links(compiler, source, compile_flags, link_flags):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "probe.c")
        with open(path, "w") as f:
            f.write(source)
        try:
            objects = compiler.compile([path], output_dir=tmp, extra_postargs=compile_flags)
            # The extension's link sees LDFLAGS (e.g. -fsanitize=address); so must the probe's.
            compiler.link_executable(objects, "probe", output_dir=tmp,
                                     extra_postargs=link_flags
                                     + shlex.split(os.environ.get("LDFLAGS", "")))
        except Exception:  # any compiler or linker failure means "not available"
            return False
    return True


class BuildWithProbes(build_ext):
    def build_extensions(self):
        if self.compiler.compiler_type == "msvc":
            compile_flags, link_flags = ["/O2", "/openmp"], []
        else:
            # -Wno-psabi: _simd.h's static inline functions pass 64-byte vectors, which on a
            # target without AVX-512 draws a note about an ABI no caller outside them sees.
            # -ffp-contract=off: every loop rounds as its source says (no fused multiply-add
            # in some copies of a formula and not others), so that different kernel paths
            # computing the same formula agree bitwise (the fused activations rely on it).
            compile_flags, link_flags = ["-O3", "-Wno-psabi", "-ffp-contract=off"], []
            march = os.environ.get("CBN_MARCH", "native")
            if march and compiles_and_links(self.compiler, PLAIN_PROBE, [f"-march={march}"], []):
                compile_flags.append(f"-march={march}")
            if os.environ.get("CBN_OPENMP") == "0":
                warnings.warn("cbn: CBN_OPENMP=0, the kernels are built SERIAL (one thread).")
            elif compiles_and_links(self.compiler, OPENMP_PROBE, ["-fopenmp"], ["-fopenmp"]):
                compile_flags.append("-fopenmp")
                link_flags.append("-fopenmp")
            else:
                warnings.warn("cbn: this C compiler cannot build OpenMP programs; the kernels "
                              "are built SERIAL (one thread). Install an OpenMP runtime "
                              "(e.g. libgomp or libomp) and rebuild for multi-threading.")
        for extension in self.extensions:
            extension.extra_compile_args += compile_flags
            extension.extra_link_args += link_flags
        super().build_extensions()


kernels = Extension(
    "cbn._kernels",
    sources=["cbn/_kernels.pyx"],
    include_dirs=[numpy.get_include(), "cbn"],
    define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_9_API_VERSION")],
)

setup(
    ext_modules=cythonize([kernels], language_level=3),
    cmdclass={"build_ext": BuildWithProbes},
)
