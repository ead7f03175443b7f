/* Which of cbn's instruction-set levels this CPU and its operating system can run, and
 * which levels this build compiled (cbn._dispatch picks from both).
 *
 * Compiled without any -march flag, so that importing it is safe on every CPU of the
 * platform. On x86-64 the levels are the psABI's: "baseline" = x86-64-v2, "avx2" =
 * x86-64-v3 (AVX2, FMA, BMI1/2, F16C, LZCNT, MOVBE), "avx512" = x86-64-v4 (AVX-512 F, BW,
 * CD, DQ, VL), each the exact -march setup.py compiles that level with. A level also needs
 * the OS to save its registers on a context switch (XCR0, read with xgetbv): a CPU with
 * AVX-512 under an OS or hypervisor that does not enable it must not run AVX-512 code.
 * (macOS enables AVX-512 state lazily, at first use, so there the avx512 level is not
 * chosen and avx2 runs instead: slower on those few Macs, never a crash.)
 * Other architectures have one level, the compiler's default target.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#ifndef CBN_BUILT_LEVELS
#error "setup.py defines CBN_BUILT_LEVELS, the levels compiled into this build"
#endif

#if defined(__x86_64__) || defined(_M_X64)
#if defined(_MSC_VER)
#include <intrin.h>
static void cpuid(unsigned leaf, unsigned subleaf, unsigned regs[4]) {
    int r[4];
    __cpuidex(r, (int)leaf, (int)subleaf);
    for (int i = 0; i < 4; i++) regs[i] = (unsigned)r[i];
}
static unsigned long long os_saved_state(void) { return _xgetbv(0); }
#else
#include <cpuid.h>
static void cpuid(unsigned leaf, unsigned subleaf, unsigned regs[4]) {
    __cpuid_count(leaf, subleaf, regs[0], regs[1], regs[2], regs[3]);
}
static unsigned long long os_saved_state(void) {  /* xgetbv(0) without needing -mxsave */
    unsigned lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((unsigned long long)hi << 32) | lo;
}
#endif

#define BIT(n) (1u << (n))
#define HAS(reg, bits) (((reg) & (bits)) == (bits))

/* The number of levels this CPU runs: 0 (not even x86-64-v2) to 3 (x86-64-v4). */
static int x86_levels(void) {
    unsigned basic[4], ext[4] = {0}, leaf7[4] = {0}, max_ext[4];
    cpuid(0, 0, basic);
    unsigned max_leaf = basic[0];
    cpuid(1, 0, basic);
    if (max_leaf >= 7) cpuid(7, 0, leaf7);
    cpuid(0x80000000u, 0, max_ext);
    if (max_ext[0] >= 0x80000001u) cpuid(0x80000001u, 0, ext);
    unsigned ecx1 = basic[2], ebx7 = leaf7[1], ecx_ext = ext[2];

    /* SSE3, SSSE3, CX16, SSE4.1, SSE4.2, POPCNT; LAHF/SAHF in 64-bit mode */
    int v2 = HAS(ecx1, BIT(0) | BIT(9) | BIT(13) | BIT(19) | BIT(20) | BIT(23))
             && HAS(ecx_ext, BIT(0));
    if (!v2) return 0;
    int osxsave = HAS(ecx1, BIT(27));
    unsigned long long xcr0 = osxsave ? os_saved_state() : 0;
    /* FMA, MOVBE, AVX, F16C; BMI1, AVX2, BMI2; LZCNT; the OS saves XMM and YMM state */
    int v3 = HAS(ecx1, BIT(12) | BIT(22) | BIT(28) | BIT(29))
             && HAS(ebx7, BIT(3) | BIT(5) | BIT(8)) && HAS(ecx_ext, BIT(5))
             && (xcr0 & 0x6) == 0x6;
    if (!v3) return 1;
    /* AVX-512 F, DQ, CD, BW, VL; the OS saves opmask and all 32 ZMM registers too */
    int v4 = HAS(ebx7, BIT(16) | BIT(17) | BIT(28) | BIT(30) | BIT(31))
             && (xcr0 & 0xe6) == 0xe6;
    return v4 ? 3 : 2;
}

static PyObject *supported_levels(PyObject *self, PyObject *unused) {
    static const char *const names[] = {"baseline", "avx2", "avx512"};
    int n = x86_levels();
    PyObject *levels = PyTuple_New(n);
    for (int i = 0; levels && i < n; i++) {
        PyObject *name = PyUnicode_FromString(names[i]);
        if (!name) {
            Py_CLEAR(levels);
            break;
        }
        PyTuple_SET_ITEM(levels, i, name);
    }
    return levels;
}
#else
static PyObject *supported_levels(PyObject *self, PyObject *unused) {
    return Py_BuildValue("(s)", "baseline");
}
#endif

static PyMethodDef methods[] = {
    {"supported_levels", supported_levels, METH_NOARGS,
     "The levels this CPU and OS can run, lowest first (x86-64: of baseline, avx2, avx512)."},
    {NULL, NULL, 0, NULL},
};

static int add_built_levels(PyObject *module) {
    return PyModule_AddStringConstant(module, "BUILT_LEVELS", CBN_BUILT_LEVELS);
}

static PyModuleDef_Slot slots[] = {
    {Py_mod_exec, add_built_levels},
    {0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_cpu",
    "The instruction-set levels of cbn's kernels: compiled (BUILT_LEVELS, lowest first, "
    "space-separated) and runnable here (supported_levels()).",
    0, methods, slots, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__cpu(void) { return PyModuleDef_Init(&module); }
