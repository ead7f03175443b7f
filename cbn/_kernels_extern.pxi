# Declarations of the C loops (_simd.h, _activation.h) and platform facts (_platform.h).
# Part of cbn/_kernels.pyx, which includes it.

cdef extern from "_simd.h":
    void cbn_shifted_sums_f32(const float *p, int64_t row_stride, int64_t n_rows,
                              int64_t width, const double *shift, double *s1,
                              double *s2) noexcept nogil
    void cbn_shifted_sums_f64(const double *p, int64_t row_stride, int64_t n_rows,
                              int64_t width, const double *shift, double *s1,
                              double *s2) noexcept nogil
    void cbn_gradient_sums_f32(const float *dy, int64_t dy_row_stride, const float *x,
                               int64_t x_row_stride, int64_t n_rows, int64_t width,
                               const double *mean, double *sum_dy,
                               double *sum_dy_xc) noexcept nogil
    void cbn_gradient_sums_f64(const double *dy, int64_t dy_row_stride, const double *x,
                               int64_t x_row_stride, int64_t n_rows, int64_t width,
                               const double *mean, double *sum_dy,
                               double *sum_dy_xc) noexcept nogil

    void cbn_shifted_sums_run_f32(const float *p, int64_t n, double shift, double *s1,
                                  double *s2) noexcept nogil
    void cbn_shifted_sums_run_f64(const double *p, int64_t n, double shift, double *s1,
                                  double *s2) noexcept nogil
    void cbn_shifted_sums_steps_f32(const float *p, int64_t step, int64_t n, double shift,
                                    double *s1, double *s2) noexcept nogil
    void cbn_shifted_sums_steps_f64(const double *p, int64_t step, int64_t n, double shift,
                                    double *s1, double *s2) noexcept nogil
    void cbn_gradient_sums_steps_f32(const float *dy, int64_t dy_step, int64_t dy_row_step,
                                     const float *x, int64_t x_step, int64_t x_row_step,
                                     int64_t n_rows, int64_t n, double mean, double *sum_dy,
                                     double *sum_dy_xc) noexcept nogil
    void cbn_gradient_sums_steps_f64(const double *dy, int64_t dy_step, int64_t dy_row_step,
                                     const double *x, int64_t x_step, int64_t x_row_step,
                                     int64_t n_rows, int64_t n, double mean, double *sum_dy,
                                     double *sum_dy_xc) noexcept nogil
    void cbn_shifted_sums_rows_f32(const float *base, const int64_t *rows, int64_t n_rows,
                                   int64_t n, double shift, double *s1,
                                   double *s2) noexcept nogil
    void cbn_shifted_sums_rows_f64(const double *base, const int64_t *rows, int64_t n_rows,
                                   int64_t n, double shift, double *s1,
                                   double *s2) noexcept nogil
    void cbn_gradient_sums_rows_f32(const float *dy_base, const int64_t *dy_rows,
                                    const float *x_base, const int64_t *x_rows, int64_t n_rows,
                                    int64_t n, double mean, double *sum_dy,
                                    double *sum_dy_xc) noexcept nogil
    void cbn_gradient_sums_rows_f64(const double *dy_base, const int64_t *dy_rows,
                                    const double *x_base, const int64_t *x_rows, int64_t n_rows,
                                    int64_t n, double mean, double *sum_dy,
                                    double *sum_dy_xc) noexcept nogil

    void cbn_normalize_stream_f32(const float *x, float *y, int64_t n, const double *mean,
                                  const double *scale, const double *shift,
                                  int per_element) noexcept nogil
    void cbn_normalize_stream_f64(const double *x, double *y, int64_t n, const double *mean,
                                  const double *scale, const double *shift,
                                  int per_element) noexcept nogil
    void cbn_input_gradient_stream_f32(const float *dy, const float *x, float *dx, int64_t n,
                                       const double *mean, const double *coef_dy,
                                       const double *coef_xc, const double *offset,
                                       int per_element) noexcept nogil
    void cbn_input_gradient_stream_f64(const double *dy, const double *x, double *dx,
                                       int64_t n, const double *mean, const double *coef_dy,
                                       const double *coef_xc, const double *offset,
                                       int per_element) noexcept nogil
    void cbn_store_fence() noexcept nogil
    void cbn_normalize_planes_f32(const float *x, float *y, int64_t n_planes, int64_t n,
                                  const double *mean, const double *scale, const double *shift,
                                  int stream) noexcept nogil
    void cbn_normalize_planes_f64(const double *x, double *y, int64_t n_planes, int64_t n,
                                  const double *mean, const double *scale, const double *shift,
                                  int stream) noexcept nogil
    void cbn_input_gradient_planes_f32(const float *dy, const float *x, float *dx,
                                       int64_t n_planes, int64_t n, const double *mean,
                                       const double *coef_dy, const double *coef_xc,
                                       const double *offset, int stream) noexcept nogil
    void cbn_input_gradient_planes_f64(const double *dy, const double *x, double *dx,
                                       int64_t n_planes, int64_t n, const double *mean,
                                       const double *coef_dy, const double *coef_xc,
                                       const double *offset, int stream) noexcept nogil
    void cbn_normalize_rows_stream_f32(const float *x, float *y, int64_t n_rows, int64_t width,
                                       const double *mean, const double *scale,
                                       const double *shift) noexcept nogil
    void cbn_normalize_rows_stream_f64(const double *x, double *y, int64_t n_rows,
                                       int64_t width, const double *mean, const double *scale,
                                       const double *shift) noexcept nogil
    void cbn_input_gradient_rows_stream_f32(const float *dy, const float *x, float *dx,
                                            int64_t n_rows, int64_t width, const double *mean,
                                            const double *coef_dy, const double *coef_xc,
                                            const double *offset) noexcept nogil
    void cbn_input_gradient_rows_stream_f64(const double *dy, const double *x, double *dx,
                                            int64_t n_rows, int64_t width, const double *mean,
                                            const double *coef_dy, const double *coef_xc,
                                            const double *offset) noexcept nogil
    void cbn_transpose_f32(const float *src, int64_t src_stride, int64_t n_r, int64_t n_c,
                           float *dst, int64_t dst_stride, const double *affine) noexcept nogil
    void cbn_transpose_f64(const double *src, int64_t src_stride, int64_t n_r, int64_t n_c,
                           double *dst, int64_t dst_stride, const double *affine) noexcept nogil
    void cbn_transpose_out_f32(const float *src, int64_t src_stride, int64_t n_r, int64_t n_c,
                               float *dst, int64_t dst_stride, int stream) noexcept nogil
    void cbn_transpose_out_f64(const double *src, int64_t src_stride, int64_t n_r,
                               int64_t n_c, double *dst, int64_t dst_stride,
                               int stream) noexcept nogil
    void cbn_normalize_steps_f32(const float *x, int64_t x_step, int64_t x_row_step,
                                 float *y, int64_t y_step, int64_t y_row_step, int64_t n_rows,
                                 int64_t n, double mean, double scale, double shift,
                                 int stream) noexcept nogil
    void cbn_normalize_steps_f64(const double *x, int64_t x_step, int64_t x_row_step,
                                 double *y, int64_t y_step, int64_t y_row_step, int64_t n_rows,
                                 int64_t n, double mean, double scale, double shift,
                                 int stream) noexcept nogil
    void cbn_input_gradient_steps_f32(const float *dy, int64_t dy_step, int64_t dy_row_step,
                                      const float *x, int64_t x_step, int64_t x_row_step,
                                      float *dx, int64_t dx_step, int64_t dx_row_step,
                                      int64_t n_rows, int64_t n, double mean, double coef_dy,
                                      double coef_xc, double offset, int stream) noexcept nogil
    void cbn_input_gradient_steps_f64(const double *dy, int64_t dy_step, int64_t dy_row_step,
                                      const double *x, int64_t x_step, int64_t x_row_step,
                                      double *dx, int64_t dx_step, int64_t dx_row_step,
                                      int64_t n_rows, int64_t n, double mean, double coef_dy,
                                      double coef_xc, double offset, int stream) noexcept nogil
    void cbn_reverse_rows_f32(const float *src, int64_t src_stride, int64_t n_rows,
                              int64_t width, float *dst, int64_t dst_stride) noexcept nogil
    void cbn_reverse_rows_f64(const double *src, int64_t src_stride, int64_t n_rows,
                              int64_t width, double *dst, int64_t dst_stride) noexcept nogil
    void cbn_prefetch_tile(const char *p, int64_t row_stride, int64_t step, int64_t n_rows,
                           int64_t width, int64_t itemsize, int for_writing) noexcept nogil
    void cbn_gradient_sums_pair_f32(const float *a, int64_t a_step, const float *b,
                                    int64_t b_step, int64_t n_rows, int64_t n, int a_is_dy,
                                    double mean, double *sum_dy,
                                    double *sum_dy_xc) noexcept nogil
    void cbn_gradient_sums_pair_f64(const double *a, int64_t a_step, const double *b,
                                    int64_t b_step, int64_t n_rows, int64_t n, int a_is_dy,
                                    double mean, double *sum_dy,
                                    double *sum_dy_xc) noexcept nogil
    void cbn_input_gradient_pair_f32(const float *a, int64_t a_step, const float *b,
                                     int64_t b_step, float *dx, int64_t dx_step,
                                     int64_t n_rows, int64_t n, int a_is_dy, double mean,
                                     double coef_dy, double coef_xc,
                                     double offset) noexcept nogil
    void cbn_input_gradient_pair_f64(const double *a, int64_t a_step, const double *b,
                                     int64_t b_step, double *dx, int64_t dx_step,
                                     int64_t n_rows, int64_t n, int a_is_dy, double mean,
                                     double coef_dy, double coef_xc,
                                     double offset) noexcept nogil
    void cbn_normalize_strips_f32(const float *x, int64_t x_row_stride, float *y,
                                  int64_t y_row_stride, int64_t n_rows, int64_t width,
                                  const double *mean, const double *scale, const double *shift,
                                  int stream) noexcept nogil
    void cbn_normalize_strips_f64(const double *x, int64_t x_row_stride, double *y,
                                  int64_t y_row_stride, int64_t n_rows, int64_t width,
                                  const double *mean, const double *scale, const double *shift,
                                  int stream) noexcept nogil
    void cbn_input_gradient_strips_f32(const float *dy, int64_t dy_row_stride, const float *x,
                                       int64_t x_row_stride, float *dx, int64_t dx_row_stride,
                                       int64_t n_rows, int64_t width, const double *mean,
                                       const double *coef_dy, const double *coef_xc,
                                       const double *offset, int stream) noexcept nogil
    void cbn_input_gradient_strips_f64(const double *dy, int64_t dy_row_stride,
                                       const double *x, int64_t x_row_stride, double *dx,
                                       int64_t dx_row_stride, int64_t n_rows, int64_t width,
                                       const double *mean, const double *coef_dy,
                                       const double *coef_xc, const double *offset,
                                       int stream) noexcept nogil
    void cbn_normalize_flat_strips_f32(const float *x, float *y, int64_t n_rows, int64_t width,
                                       const double *mean, const double *scale,
                                       const double *shift) noexcept nogil
    void cbn_normalize_flat_strips_f64(const double *x, double *y, int64_t n_rows,
                                       int64_t width, const double *mean, const double *scale,
                                       const double *shift) noexcept nogil
    void cbn_input_gradient_flat_strips_f32(const float *dy, const float *x, float *dx,
                                            int64_t n_rows, int64_t width, const double *mean,
                                            const double *coef_dy, const double *coef_xc,
                                            const double *offset) noexcept nogil
    void cbn_input_gradient_flat_strips_f64(const double *dy, const double *x, double *dx,
                                            int64_t n_rows, int64_t width, const double *mean,
                                            const double *coef_dy, const double *coef_xc,
                                            const double *offset) noexcept nogil
    int CBN_MAX_WIDTH

cdef extern from "_cross.h":
    const bint CBN_CROSS      # the crosswise loops are built (float32 with AVX)
    void cbn_normalize_cross_f32(const float *x, int64_t x_row_stride,
                                 int64_t x_feature_stride, float *y, int64_t y_row_stride,
                                 int64_t y_feature_stride, int64_t n_rows, int64_t width,
                                 const double *mean, const double *scale, const double *shift,
                                 int stream) noexcept nogil
    void cbn_input_gradient_cross_f32(const float *dy, int64_t dy_row_stride,
                                      int64_t dy_feature_stride, const float *x,
                                      int64_t x_row_stride, int64_t x_feature_stride,
                                      float *dx, int64_t dx_row_stride,
                                      int64_t dx_feature_stride, int64_t n_rows, int64_t width,
                                      const double *mean, const double *coef_dy,
                                      const double *coef_xc, const double *offset,
                                      int stream) noexcept nogil
    void cbn_gradient_sums_cross_f32(const float *dy, int64_t dy_row_stride,
                                     int64_t dy_feature_stride, const float *x,
                                     int64_t x_row_stride, int64_t x_feature_stride,
                                     int64_t n_rows, int64_t width, int64_t run_rows,
                                     const double *mean, double *sum_dy,
                                     double *sum_dy_xc) noexcept nogil


cdef extern from "_activation.h":
    enum:
        CBN_ACT_NONE
        CBN_ACT_RELU
        CBN_ACT_LEAKY_RELU
        CBN_ACT_ELU
    float cbn_act_f32(float z, int kind, double alpha) noexcept nogil
    double cbn_act_f64(double z, int kind, double alpha) noexcept nogil
    float cbn_dz1_f32(float dy, const float *y, int64_t y_step, const unsigned char *mask,
                      int64_t b, int64_t bit_step, int64_t i, int kind,
                      double alpha) noexcept nogil
    double cbn_dz1_f64(double dy, const double *y, int64_t y_step, const unsigned char *mask,
                       int64_t b, int64_t bit_step, int64_t i, int kind,
                       double alpha) noexcept nogil
    void cbn_set_bit(unsigned char *mask, int64_t b, int value) noexcept nogil
    void cbn_set_row_signs_f32(unsigned char *mask, int64_t b, int64_t bit_step, const float *y,
                               int64_t y_row_stride, int64_t n_rows, int64_t width) noexcept nogil
    void cbn_set_row_signs_f64(unsigned char *mask, int64_t b, int64_t bit_step,
                               const double *y, int64_t y_row_stride, int64_t n_rows,
                               int64_t width) noexcept nogil
    void cbn_normalize_act_f32(const float *x, const float *residual, float *y, int64_t n,
                               const double *mean, const double *scale, const double *shift,
                               int per_element, int kind, double alpha, int stream,
                               unsigned char *mask, int64_t b, int64_t bit_step, int64_t lo,
                               int64_t hi) noexcept nogil
    void cbn_normalize_act_f64(const double *x, const double *residual, double *y, int64_t n,
                               const double *mean, const double *scale, const double *shift,
                               int per_element, int kind, double alpha, int stream,
                               unsigned char *mask, int64_t b, int64_t bit_step, int64_t lo,
                               int64_t hi) noexcept nogil
    void cbn_act_input_gradient_f32(const float *dy, const float *y, const float *x, float *dx,
                                    float *dres, int64_t n, const double *mean,
                                    const double *coef_dy, const double *coef_xc,
                                    const double *offset, int per_element, int kind,
                                    double alpha, int stream, const unsigned char *mask,
                                    int64_t b, int64_t bit_step) noexcept nogil
    void cbn_act_input_gradient_f64(const double *dy, const double *y, const double *x,
                                    double *dx, double *dres, int64_t n, const double *mean,
                                    const double *coef_dy, const double *coef_xc,
                                    const double *offset, int per_element, int kind,
                                    double alpha, int stream, const unsigned char *mask,
                                    int64_t b, int64_t bit_step) noexcept nogil
    void cbn_normalize_act_planes_f32(const float *x, int64_t x_step, const float *residual,
                                      int64_t r_step, float *y, int64_t y_step,
                                      int64_t n_planes, int64_t n, const double *mean,
                                      const double *scale, const double *shift, int kind,
                                      double alpha, int stream, unsigned char *mask, int64_t b,
                                      int64_t b_step, int64_t bit_step) noexcept nogil
    void cbn_normalize_act_planes_f64(const double *x, int64_t x_step, const double *residual,
                                      int64_t r_step, double *y, int64_t y_step,
                                      int64_t n_planes, int64_t n, const double *mean,
                                      const double *scale, const double *shift, int kind,
                                      double alpha, int stream, unsigned char *mask, int64_t b,
                                      int64_t b_step, int64_t bit_step) noexcept nogil
    void cbn_act_input_gradient_planes_f32(const float *dy, int64_t dy_step, const float *y,
                                           int64_t y_step, const float *x, int64_t x_step,
                                           float *dx, int64_t dx_step, float *dres,
                                           int64_t dres_step, int64_t n_planes, int64_t n,
                                           const double *mean, const double *coef_dy,
                                           const double *coef_xc, const double *offset,
                                           int kind, double alpha, int stream,
                                           const unsigned char *mask, int64_t b,
                                           int64_t b_step, int64_t bit_step) noexcept nogil
    void cbn_act_input_gradient_planes_f64(const double *dy, int64_t dy_step, const double *y,
                                           int64_t y_step, const double *x, int64_t x_step,
                                           double *dx, int64_t dx_step, double *dres,
                                           int64_t dres_step, int64_t n_planes, int64_t n,
                                           const double *mean, const double *coef_dy,
                                           const double *coef_xc, const double *offset,
                                           int kind, double alpha, int stream,
                                           const unsigned char *mask, int64_t b,
                                           int64_t b_step, int64_t bit_step) noexcept nogil
    void cbn_act_gradient_sums_f32(const float *dy, int64_t dy_row_stride, const float *y,
                                   int64_t y_row_stride, const float *x, int64_t x_row_stride,
                                   int64_t n_rows, int64_t width, const double *mean, int kind,
                                   double alpha, double *sum_dy, double *sum_dy_xc,
                                   const unsigned char *mask, int64_t b,
                                   int64_t mask_row_stride, int64_t bit_step) noexcept nogil
    void cbn_act_gradient_sums_f64(const double *dy, int64_t dy_row_stride, const double *y,
                                   int64_t y_row_stride, const double *x, int64_t x_row_stride,
                                   int64_t n_rows, int64_t width, const double *mean, int kind,
                                   double alpha, double *sum_dy, double *sum_dy_xc,
                                   const unsigned char *mask, int64_t b,
                                   int64_t mask_row_stride, int64_t bit_step) noexcept nogil
    void cbn_act_gradient_sums_run_f32(const float *dy, int64_t dy_step, const float *y,
                                       int64_t y_step, const float *x, int64_t n, double mean,
                                       int kind, double alpha, double *sum_dy,
                                       double *sum_dy_xc, const unsigned char *mask, int64_t b,
                                       int64_t bit_step) noexcept nogil
    void cbn_act_gradient_sums_run_f64(const double *dy, int64_t dy_step, const double *y,
                                       int64_t y_step, const double *x, int64_t n,
                                       double mean, int kind, double alpha, double *sum_dy,
                                       double *sum_dy_xc, const unsigned char *mask, int64_t b,
                                       int64_t bit_step) noexcept nogil
    void cbn_act_gradient_sums_steps_f32(const float *dy, int64_t dy_step, const float *y,
                                         int64_t y_step, const float *x, int64_t x_step,
                                         int64_t n, double mean, int kind, double alpha,
                                         double *sum_dy, double *sum_dy_xc,
                                         const unsigned char *mask, int64_t b,
                                         int64_t bit_step) noexcept nogil
    void cbn_act_gradient_sums_steps_f64(const double *dy, int64_t dy_step, const double *y,
                                         int64_t y_step, const double *x, int64_t x_step,
                                         int64_t n, double mean, int kind, double alpha,
                                         double *sum_dy, double *sum_dy_xc,
                                         const unsigned char *mask, int64_t b,
                                         int64_t bit_step) noexcept nogil
    void cbn_act_gradient_sums_rows_f32(const float *dy_base, const int64_t *dy_rows,
                                        int64_t dy_step, const float *y_base,
                                        const int64_t *y_rows, int64_t y_step,
                                        const float *x_base, const int64_t *x_rows,
                                        int64_t n_rows, int64_t n, double mean, int kind,
                                        double alpha, double *sum_dy, double *sum_dy_xc,
                                        const unsigned char *mask, int64_t bit_base,
                                        const int64_t *bit_rows, int64_t bit_step) noexcept nogil
    void cbn_act_gradient_sums_rows_f64(const double *dy_base, const int64_t *dy_rows,
                                        int64_t dy_step, const double *y_base,
                                        const int64_t *y_rows, int64_t y_step,
                                        const double *x_base, const int64_t *x_rows,
                                        int64_t n_rows, int64_t n, double mean, int kind,
                                        double alpha, double *sum_dy, double *sum_dy_xc,
                                        const unsigned char *mask, int64_t bit_base,
                                        const int64_t *bit_rows, int64_t bit_step) noexcept nogil
    void cbn_act_normalize_strips_f32(const float *x, int64_t x_row_stride,
                                      const float *residual, int64_t r_row_stride, float *y,
                                      int64_t y_row_stride, int64_t n_rows, int64_t width,
                                      const double *mean, const double *scale,
                                      const double *shift, int kind, double alpha, int stream,
                                      unsigned char *mask, int64_t bit0,
                                      int64_t mask_row_stride) noexcept nogil
    void cbn_act_normalize_strips_f64(const double *x, int64_t x_row_stride,
                                      const double *residual, int64_t r_row_stride, double *y,
                                      int64_t y_row_stride, int64_t n_rows, int64_t width,
                                      const double *mean, const double *scale,
                                      const double *shift, int kind, double alpha, int stream,
                                      unsigned char *mask, int64_t bit0,
                                      int64_t mask_row_stride) noexcept nogil
    void cbn_act_input_gradient_strips_f32(
        const float *dy, int64_t dy_row_stride, const float *y, int64_t y_row_stride,
        const float *x, int64_t x_row_stride, float *dx, int64_t dx_row_stride, float *dres,
        int64_t dres_row_stride, int64_t n_rows, int64_t width, const double *mean,
        const double *coef_dy, const double *coef_xc, const double *offset, int kind,
        double alpha, int stream, const unsigned char *mask, int64_t bit0,
        int64_t mask_row_stride) noexcept nogil
    void cbn_act_input_gradient_strips_f64(
        const double *dy, int64_t dy_row_stride, const double *y, int64_t y_row_stride,
        const double *x, int64_t x_row_stride, double *dx, int64_t dx_row_stride,
        double *dres, int64_t dres_row_stride, int64_t n_rows, int64_t width,
        const double *mean, const double *coef_dy, const double *coef_xc,
        const double *offset, int kind, double alpha, int stream, const unsigned char *mask,
        int64_t bit0, int64_t mask_row_stride) noexcept nogil

cdef extern from "_platform.h":
    int cbn_openmp_enabled() noexcept nogil
    int cbn_max_threads() noexcept nogil
    const char *cbn_simd_flags() noexcept
