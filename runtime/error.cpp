#include "runtime/error.h"

namespace moesh {

std::string quote_untrusted(std::string_view s, bool keep_utf8) {
    constexpr size_t k_max = 160;
    static const char hex[] = "0123456789abcdef";
    std::string out = "'";
    for (size_t i = 0; i < s.size() && i < k_max; ++i) {
        const unsigned char c = static_cast<unsigned char>(s[i]);
        if (c < 0x20 || c == 0x7f || (c > 0x7f && !keep_utf8)) {
            out += "\\x";
            out += hex[c >> 4];
            out += hex[c & 15];
        } else {
            out += static_cast<char>(c);
        }
    }
    if (s.size() > k_max) out += "...";
    out += "'";
    return out;
}

} // namespace moesh
