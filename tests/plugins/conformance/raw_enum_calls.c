/* Calls with enum values outside the enumerators, as any C host may make.
 * Legal in C; in C++ merely forming such an enum value is undefined. */
#include <moesh/plugin.h>

int32_t moesh_test_supports_raw(const moesh_backend_iface * be, moesh_backend * ctx, int32_t op, int32_t w_type) {
    return be->supports(ctx, (moesh_op)op, (moesh_dtype)w_type);
}
