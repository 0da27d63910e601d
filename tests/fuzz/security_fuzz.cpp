// libFuzzer target for who may connect (transport/security.h): the bytes as a CURVE certificate
// (public and secret), a list of client keys, an API key file and an Authorization header.
// Accepted means: read as a public certificate. Invariants: every key read is a Z85 key, a secret
// key's public key is derived from it, what is read writes back and reads back the same, and an
// API key check passes exactly when the header's token is one of the keys.
#include "fuzz_targets.h"

#include "transport/security.h"

#include <stdexcept>
#include <string>
#include <string_view>

namespace moesh::fuzz {

namespace {

using namespace moesh::security;

void check(bool ok, const char * what) { require(ok, "security", what); }

template <class F> bool accepted(F f) {
    try {
        f();
        return true;
    } catch (const std::runtime_error & e) {
        check(e.what()[0] != '\0', "an empty error message");
        return false;
    }
}

void check_cert(const CurveCert & c, bool secret) {
    check(is_z85_key(c.public_key), "a certificate's public key is not a Z85 key");
    check(!secret || !c.secret_key.empty(), "a secret certificate without its secret key");
    if (c.secret_key.empty()) return;
    check(is_z85_key(c.secret_key), "a secret key that is not a Z85 key");
    const CurveCert again = parse_curve_cert(curve_cert_text(c, true), "again", true);
    check(again.public_key == c.public_key && again.secret_key == c.secret_key, "a secret certificate does not read back");
}

} // namespace

bool security_one_input(const uint8_t * data, size_t size) {
    const std::string_view text(reinterpret_cast<const char *>(data), size);

    CurveCert pub;
    const bool ok = accepted([&] { pub = parse_curve_cert(text, "fuzz", false); });
    if (ok) {
        check_cert(pub, false);
        const CurveCert again = parse_curve_cert(curve_cert_text(pub, false), "again", false);
        check(again.public_key == pub.public_key && again.secret_key.empty(), "a public certificate does not read back");
    }
    CurveCert sec;
    if (accepted([&] { sec = parse_curve_cert(text, "fuzz", true); })) {
        check_cert(sec, true);
        check(ok, "read as a secret certificate but not as a public one");
        // (a bare key is the secret key in one reading and the public key in the other)
        check(pub.secret_key.empty() || (pub.secret_key == sec.secret_key && pub.public_key == sec.public_key),
              "the two readings of a certificate differ");
    }

    std::vector<std::string> keys;
    if (accepted([&] { keys = parse_key_list(text, "fuzz"); })) {
        std::string joined;
        for (const std::string & k : keys) {
            check(is_z85_key(k), "a listed key is not a Z85 key");
            joined += k + "\n";
        }
        check(parse_key_list(joined, "again") == keys, "a key list does not read back");
    }

    std::vector<std::string> api;
    if (accepted([&] { api = parse_api_keys(text, "fuzz"); })) {
        for (const std::string & k : api) {
            check(k.size() >= 16 && k.size() <= 512, "an API key's length");
            for (char ch : k) check(ch > 0x20 && ch < 0x7f, "an API key with a space or a byte outside visible ASCII");
            check(check_api_key(api, "Bearer " + k) == ApiKeyCheck::Ok, "a key of the file is refused");
            check(check_api_key(api, "Bearer " + k + "x") == ApiKeyCheck::Wrong, "a key with more after it passes");
        }
    }
    // The bytes as a header against the keys and against a fixed key.
    const std::vector<std::string> fixed = {"sk-fuzz-0123456789abcdef"};
    for (const std::vector<std::string> * ks : {&fixed, const_cast<const std::vector<std::string> *>(&api)}) {
        if (ks->empty()) continue;
        if (check_api_key(*ks, text) == ApiKeyCheck::Ok) {
            std::string_view t = text;
            while (!t.empty() && (t.front() == ' ' || t.front() == '\t')) t.remove_prefix(1);
            while (!t.empty() && (t.back() == ' ' || t.back() == '\t')) t.remove_suffix(1);
            t.remove_prefix(6);
            while (!t.empty() && (t.front() == ' ' || t.front() == '\t')) t.remove_prefix(1);
            bool found = false;
            for (const std::string & k : *ks) found = found || k == t;
            check(found, "a header passes whose token is no key");
        }
    }
    return ok;
}

} // namespace moesh::fuzz

#ifdef MOESH_FUZZ_ENTRY
extern "C" int LLVMFuzzerTestOneInput(const uint8_t * data, size_t size) {
    moesh::fuzz::security_one_input(data, size);
    return 0;
}
#endif
