// moesh::Error: what loading and configuration throw (bad config, bad or
// missing files). The message names the file and the problem, plus the
// tensor, JSON key or byte offset where there is one:
//
//   throw moesh::Error("model/model.safetensors: tensor 'w': data_offsets [0, 8] end past ...");
//
// Hot paths never throw; see STYLE.md ("Errors").
#pragma once

#include <stdexcept>

namespace moesh {

class Error : public std::runtime_error {
public:
    using std::runtime_error::runtime_error;
};

} // namespace moesh
