// moesh::Error: what loading and configuration throw (bad config, bad or
// missing files). The message names the file and the problem, plus the
// tensor, JSON key or byte offset where there is one:
//
//   throw moesh::Error("model/model.safetensors: tensor 'w': data_offsets [0, 8] end past ...");
//
// Hot paths never throw; see STYLE.md ("Errors").
#pragma once

#include <stdexcept>
#include <string>
#include <string_view>

namespace moesh {

class Error : public std::runtime_error {
public:
    using std::runtime_error::runtime_error;
};

// A name or key from an untrusted file, quoted for a message: control bytes
// (and, unless keep_utf8, every byte >= 0x7f) as \xNN, cut after 160 bytes.
std::string quote_untrusted(std::string_view s, bool keep_utf8);

} // namespace moesh
