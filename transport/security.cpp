#include "transport/security.h"

#include "transport/protocol.h"

#include <zmq.hpp>
#include <zmq_addon.hpp>

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <stdexcept>

namespace moesh::security {

namespace {

[[noreturn]] void fail(std::string_view source, size_t line, const std::string & what) {
    std::string s(source);
    if (line) s += ":" + std::to_string(line);
    throw std::runtime_error(s + ": " + what);
}

std::string read_file(const std::string & path, const char * what, size_t limit) {
    std::error_code ec;
    if (std::filesystem::is_directory(path, ec)) throw std::runtime_error(std::string(what) + " " + path + " is a directory, not a file");
    std::ifstream f(path, std::ios::binary);
    if (!f) throw std::runtime_error(std::string("cannot read ") + what + " " + path + ": " + std::strerror(errno));
    std::string text;
    char buf[4096];
    while (f.read(buf, sizeof buf) || f.gcount() > 0) {
        text.append(buf, size_t(f.gcount()));
        if (text.size() > limit)
            throw std::runtime_error(std::string(what) + " " + path + " is larger than " + std::to_string(limit) + " bytes");
    }
    return text;
}

// The lines of text, spaces around trimmed; calls f(line_number, line) for every line that is
// neither blank nor a comment (first visible character '#': Z85 keys may hold '#' themselves).
template <class F> void for_lines(std::string_view text, F f) {
    size_t n = 0;
    while (!text.empty()) {
        size_t end = text.find('\n');
        std::string_view line = text.substr(0, end);
        text = end == std::string_view::npos ? std::string_view() : text.substr(end + 1);
        ++n;
        while (!line.empty() && (line.front() == ' ' || line.front() == '\t')) line.remove_prefix(1);
        while (!line.empty() && (line.back() == ' ' || line.back() == '\t' || line.back() == '\r')) line.remove_suffix(1);
        if (!line.empty() && line.front() != '#') f(n, line);
    }
}

// Untrusted text for an error message, quoted.
std::string shown(std::string_view s) {
    std::string q(1, '"');   // appended, not "\"" + ...: GCC 12 warns falsely (-Wrestrict) on that
    q += protocol::escaped(s, 48);
    q += '"';
    return q;
}

std::string key_problem(std::string_view key) {
    if (key.size() != 40) return "a key is 40 Z85 characters; this is " + std::to_string(key.size()) + ": " + shown(key);
    return "not a Z85 key (characters outside Z85's alphabet): " + shown(key);
}

std::string binary_key(const std::string & z85) {
    std::string b(32, '\0');
    if (!zmq_z85_decode(reinterpret_cast<uint8_t *>(b.data()), z85.c_str())) throw std::runtime_error("not a Z85 key");
    return b;
}

std::string z85(const void * bytes) {
    char out[41];
    zmq_z85_encode(out, static_cast<const uint8_t *>(bytes), 32);
    return std::string(out, 40);
}

std::string public_of(const std::string & secret_z85) {
    char pub[41];
    if (zmq_curve_public(pub, secret_z85.c_str()) != 0)
        throw std::runtime_error("cannot derive a public key (is this libzmq built with CURVE?)");
    return std::string(pub, 40);
}

} // namespace

bool is_z85_key(std::string_view text) {
    // Checked here, not only by zmq_z85_decode: it reads up to a NUL, and a group may overflow
    // 32 bits; a key must encode back to itself.
    static constexpr std::string_view alphabet =
        "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#";
    if (text.size() != 40) return false;
    for (char ch : text)
        if (alphabet.find(ch) == std::string_view::npos) return false;
    const std::string s(text);
    uint8_t b[32];
    return zmq_z85_decode(b, s.c_str()) != nullptr && z85(b) == s;
}

CurveCert new_curve_cert() {
    if (!zmq_has("curve")) throw std::runtime_error("this libzmq was built without CURVE security");
    char pub[41], sec[41];
    if (zmq_curve_keypair(pub, sec) != 0) throw std::runtime_error(std::string("zmq_curve_keypair: ") + zmq_strerror(zmq_errno()));
    return {std::string(pub, 40), std::string(sec, 40)};
}

CurveCert parse_curve_cert(std::string_view text, std::string_view source, bool want_secret) {
    CurveCert c;
    size_t pub_line = 0, sec_line = 0, bare_line = 0;
    std::string bare;
    for_lines(text, [&](size_t n, std::string_view line) {
        const bool is_pub = line.rfind("public-key", 0) == 0, is_sec = line.rfind("secret-key", 0) == 0;
        if (is_pub || is_sec) {
            size_t eq = line.find('=');
            if (eq == std::string_view::npos) fail(source, n, "expected `" + std::string(line.substr(0, 10)) + " = \"KEY\"`");
            std::string_view v = line.substr(eq + 1);
            while (!v.empty() && (v.front() == ' ' || v.front() == '\t' || v.front() == '"' || v.front() == '\'')) v.remove_prefix(1);
            while (!v.empty() && (v.back() == ' ' || v.back() == '\t' || v.back() == '"' || v.back() == '\'')) v.remove_suffix(1);
            if (!is_z85_key(v)) fail(source, n, key_problem(v));
            if ((is_pub ? pub_line : sec_line) != 0) fail(source, n, std::string(is_pub ? "public-key" : "secret-key") + " given twice");
            (is_pub ? c.public_key : c.secret_key) = std::string(v);
            (is_pub ? pub_line : sec_line) = n;
        } else if (is_z85_key(line)) {
            if (bare_line) fail(source, n, "a second bare key; a file holds one key, or a certificate");
            bare = std::string(line);
            bare_line = n;
        } else if (line == "metadata" || line == "curve" || (line.find('=') != std::string_view::npos && line.find('=') > 0)) {
            // ZPL sections and metadata entries of a CZMQ/pyzmq certificate
        } else {
            fail(source, n, "neither a key nor a certificate line (`public-key = \"...\"`, `secret-key = \"...\"`): " + shown(line));
        }
    });
    if (bare_line && (pub_line || sec_line)) fail(source, bare_line, "a bare key beside public-key/secret-key lines");
    if (bare_line) (want_secret ? c.secret_key : c.public_key) = bare;
    if (want_secret && c.secret_key.empty())
        fail(source, 0, "no secret key (a `secret-key = \"...\"` line, as in a NAME.key_secret file from `moesh keygen`)");
    if (!c.secret_key.empty()) {
        const std::string derived = public_of(c.secret_key);
        if (!c.public_key.empty() && c.public_key != derived)
            fail(source, pub_line, "public-key is not the secret key's public key (" + derived + ")");
        c.public_key = derived;
    }
    if (c.public_key.empty()) fail(source, 0, "no key (a `public-key = \"...\"` line, or a 40-character Z85 key)");
    return c;
}

CurveCert load_curve_cert(const std::string & path, bool want_secret) {
    return parse_curve_cert(read_file(path, "the certificate", 1 << 16), path, want_secret);
}

std::string curve_cert_text(const CurveCert & cert, bool secret) {
    std::ostringstream o;
    o << "#   ZeroMQ CURVE " << (secret ? "secret" : "public") << " certificate, written by moesh keygen\n";
    if (secret) o << "#   Keep it private: whoever holds it can act as this key's owner.\n";
    o << "\nmetadata\ncurve\n    public-key = \"" << cert.public_key << "\"\n";
    if (secret) o << "    secret-key = \"" << cert.secret_key << "\"\n";
    return o.str();
}

std::pair<std::string, std::string> write_curve_cert(const std::string & dir, const std::string & name, const CurveCert & cert) {
    if (name.empty() || name.find('/') != std::string::npos) throw std::runtime_error("a certificate's name must be a file name: " + shown(name));
    const std::string base = (std::filesystem::path(dir) / name).string();
    const std::string pub_path = base + ".key", sec_path = base + ".key_secret";
    auto write = [](const std::string & path, const std::string & text, mode_t mode) {
        const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, mode);
        if (fd < 0)
            throw std::runtime_error("cannot create " + path + ": " + std::strerror(errno) +
                                     (errno == EEXIST ? " (remove it first, or choose another name)" : ""));
        size_t done = 0;
        while (done < text.size()) {
            const ssize_t w = ::write(fd, text.data() + done, text.size() - done);
            if (w < 0 && errno == EINTR) continue;
            if (w <= 0) {
                const int e = errno;
                ::close(fd);
                throw std::runtime_error("cannot write " + path + ": " + std::strerror(e));
            }
            done += size_t(w);
        }
        if (::close(fd) != 0) throw std::runtime_error("cannot write " + path + ": " + std::strerror(errno));
    };
    write(pub_path, curve_cert_text(cert, false), 0644);
    try {
        write(sec_path, curve_cert_text(cert, true), 0600);
    } catch (...) {
        ::unlink(pub_path.c_str());
        throw;
    }
    return {pub_path, sec_path};
}

std::vector<std::string> parse_key_list(std::string_view text, std::string_view source) {
    std::vector<std::string> keys;
    for_lines(text, [&](size_t n, std::string_view line) {
        if (!is_z85_key(line)) fail(source, n, key_problem(line) + " (one public key per line)");
        keys.emplace_back(line);
    });
    if (keys.empty()) fail(source, 0, "no keys: every client would be refused");
    return keys;
}

std::vector<std::string> load_authorized_keys(const std::string & path) {
    std::error_code ec;
    if (!std::filesystem::is_directory(path, ec)) return parse_key_list(read_file(path, "the key list", 1 << 24), path);
    std::vector<std::string> files;
    for (const auto & e : std::filesystem::directory_iterator(path, ec))
        if (e.path().extension() == ".key" && e.is_regular_file(ec)) files.push_back(e.path().string());
    if (ec) throw std::runtime_error("cannot list " + path + ": " + ec.message());
    std::sort(files.begin(), files.end());
    std::vector<std::string> keys;
    for (const std::string & f : files) keys.push_back(load_curve_cert(f, false).public_key);
    if (keys.empty()) throw std::runtime_error(path + ": no *.key certificates in this directory: every client would be refused");
    return keys;
}

std::vector<std::string> parse_api_keys(std::string_view text, std::string_view source) {
    std::vector<std::string> keys;
    for_lines(text, [&](size_t n, std::string_view line) {
        for (char ch : line)
            if (static_cast<unsigned char>(ch) <= 0x20 || static_cast<unsigned char>(ch) >= 0x7f)
                fail(source, n, "an API key is visible ASCII without spaces: " + shown(line));
        if (line.size() < 16 || line.size() > 512)
            fail(source, n, "an API key is 16 to 512 characters; this one is " + std::to_string(line.size()));
        keys.emplace_back(line);
    });
    if (keys.empty()) fail(source, 0, "no API keys: every request would be refused");
    return keys;
}

std::vector<std::string> load_api_keys(const std::string & path) { return parse_api_keys(read_file(path, "the API key file", 1 << 20), path); }

ApiKeyCheck check_api_key(const std::vector<std::string> & keys, std::string_view a) {
    while (!a.empty() && (a.front() == ' ' || a.front() == '\t')) a.remove_prefix(1);
    while (!a.empty() && (a.back() == ' ' || a.back() == '\t')) a.remove_suffix(1);
    if (a.empty()) return ApiKeyCheck::Missing;
    static constexpr std::string_view scheme = "bearer";
    if (a.size() <= scheme.size() || (a[scheme.size()] != ' ' && a[scheme.size()] != '\t')) return ApiKeyCheck::Malformed;
    for (size_t i = 0; i < scheme.size(); ++i)
        if (char(a[i] | 0x20) != scheme[i]) return ApiKeyCheck::Malformed;
    std::string_view token = a.substr(scheme.size());
    while (!token.empty() && (token.front() == ' ' || token.front() == '\t')) token.remove_prefix(1);
    if (token.empty()) return ApiKeyCheck::Malformed;
    // Every byte of every key is compared, whatever matches: the time says nothing of a key.
    unsigned found = 0;
    for (const std::string & k : keys) {
        unsigned diff = unsigned(k.size() ^ token.size());
        for (size_t i = 0; i < k.size(); ++i)
            diff |= unsigned(static_cast<unsigned char>(k[i]) ^ static_cast<unsigned char>(i < token.size() ? token[i] : 0));
        found |= unsigned(diff == 0);
    }
    return found ? ApiKeyCheck::Ok : ApiKeyCheck::Wrong;
}

// ------------------------------------------------------------------------------- ZapHandler

ZapHandler::ZapHandler(zmq::context_t & ctx, std::vector<std::string> allowed_z85, std::function<void(const std::string &)> on_deny)
    : on_deny_(std::move(on_deny)) {
    set_allowed(allowed_z85);
    // Bound here, before the caller binds its CURVE socket, so no handshake finds no handler.
    auto sock = std::make_shared<zmq::socket_t>(ctx, zmq::socket_type::rep);
    sock->set(zmq::sockopt::linger, 0);
    try {
        sock->bind("inproc://zeromq.zap.01");
    } catch (const zmq::error_t & e) {
        throw std::runtime_error(std::string("cannot start the ZAP handler: ") + e.what());
    }
    thread_ = std::thread([this, sock] { loop(sock.get()); });
}

void ZapHandler::set_allowed(const std::vector<std::string> & allowed_z85) {
    std::vector<std::string> keys;
    for (const std::string & k : allowed_z85) keys.push_back(binary_key(k));
    std::sort(keys.begin(), keys.end());
    std::lock_guard<std::mutex> lock(mu_);
    keys_ = std::move(keys);
}

bool ZapHandler::allows(const std::string & key) {
    std::lock_guard<std::mutex> lock(mu_);
    return keys_.empty() || std::binary_search(keys_.begin(), keys_.end(), key);
}

ZapHandler::~ZapHandler() {
    stop_ = true;
    if (thread_.joinable()) thread_.join();
}

void ZapHandler::loop(void * socket) {
    auto & sock = *static_cast<zmq::socket_t *>(socket);
    uint64_t since = 0;   // refusals not yet reported
    std::string last_key, last_address;
    auto reported = std::chrono::steady_clock::now() - std::chrono::seconds(2);
    auto report = [&](bool force) {
        const auto now = std::chrono::steady_clock::now();
        if (!since || !on_deny_ || (!force && now - reported < std::chrono::seconds(1))) return;
        on_deny_("refused " + std::to_string(since) + " CURVE connection" + (since > 1 ? "s" : "") +
                 " whose key is not in curve_authorized_keys (last: key " + last_key + " from " +
                 (last_address.empty() ? "?" : last_address) + ")");
        since = 0;
        reported = now;
    };
    while (!stop_.load()) {
        zmq::pollitem_t item{sock.handle(), 0, ZMQ_POLLIN, 0};
        try {
            if (zmq::poll(&item, 1, std::chrono::milliseconds(100)) <= 0) {
                report(false);
                continue;
            }
            std::vector<zmq::message_t> req;
            if (!zmq::recv_multipart(sock, std::back_inserter(req), zmq::recv_flags::dontwait)) continue;
            // RFC 27: version, request id, domain, address, routing id, mechanism, credentials...
            std::string status = "400", text = "malformed ZAP request";
            const std::string request_id = req.size() > 1 ? req[1].to_string() : "";
            if (req.size() >= 6 && req[0].to_string_view() == "1.0") {
                const std::string_view mechanism = req[5].to_string_view();
                if (mechanism == "CURVE" && req.size() == 7 && req[6].size() == 32) {
                    const std::string key = req[6].to_string();
                    if (allows(key)) {
                        status = "200", text = "OK";
                        ++allowed_;
                    } else {
                        text = "key not authorized";
                        ++denied_;
                        ++since;
                        last_key = z85(key.data());
                        last_address = req[3].to_string();
                    }
                } else {
                    text = "only CURVE clients are let in";
                    ++denied_;
                }
            }
            std::vector<zmq::message_t> rep;
            rep.emplace_back(std::string("1.0"));
            rep.emplace_back(request_id);
            rep.emplace_back(status);
            rep.emplace_back(text);
            rep.emplace_back(std::string());   // user id
            rep.emplace_back(std::string());   // metadata
            zmq::send_multipart(sock, rep);
            report(false);
        } catch (const zmq::error_t &) {
            break;   // the context is ending
        }
    }
    report(true);
}

} // namespace moesh::security
