// MLX's CPU matmuls on a fast BLAS.
//
// The mlx[cpu] wheel links libmlx.so against the reference (netlib) BLAS it bundles, whose
// cblas_sgemm is a plain triple loop: on SmolLM2's [256 x 576] x [576 x 1536] projection it took
// 0.35 s against torch's 0.011 s, single-threaded (docs/native.md, "Where the seconds go"). This
// executable defines cblas_sgemm itself and exports it, so the dynamic linker binds libmlx.so's
// calls here (the executable comes first in symbol lookup) and they go to OpenBLAS from the
// scipy-openblas32 wheel, whose symbols carry a scipy_ prefix and so never clash with the bundled
// BLAS. Same cblas interface, same column/row conventions; only sgemm is forwarded (MLX's other
// BLAS and LAPACK calls, float64 and complex, stay on the bundled library).
#ifdef MEBP_OPENBLAS

extern "C" {
void scipy_cblas_sgemm(int order, int trans_a, int trans_b, int m, int n, int k, float alpha, const float* a,
                       int lda, const float* b, int ldb, float beta, float* c, int ldc);
void scipy_openblas_set_num_threads(int threads);

void cblas_sgemm(int order, int trans_a, int trans_b, int m, int n, int k, float alpha, const float* a, int lda,
                 const float* b, int ldb, float beta, float* c, int ldc) {
  scipy_cblas_sgemm(order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
}

namespace {
// One thread, as the rest of the driver (and the eager torch step it is compared with); OpenBLAS
// would otherwise start one per core when it loads.
const bool one_blas_thread = (scipy_openblas_set_num_threads(1), true);
}  // namespace

#endif
