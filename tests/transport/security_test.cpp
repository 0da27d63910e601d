// Who may connect (transport/security.h): certificate and key files as untrusted input, the API
// key check, and the ZAP handler with real CURVE sockets in one process (the server process with
// CURVE is in tests/runtime/server_test.cpp, pyzmq's certificates in tests/clients/).
#include "transport/client.h"
#include "transport/security.h"

#include <gtest/gtest.h>
#include <zmq.hpp>
#include <zmq_addon.hpp>

#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <mutex>
#include <fstream>
#include <random>
#include <thread>

namespace moesh::security {
namespace {

using namespace std::chrono_literals;

// A fresh folder under the system's temporary one, removed at the end.
struct Scratch {
    std::filesystem::path path;
    Scratch() {
        path = std::filesystem::temp_directory_path() / ("moesh-security-" + std::to_string(::getpid()) + "-" +
                                                         std::to_string(std::random_device{}()));
        std::filesystem::create_directories(path);
    }
    ~Scratch() {
        std::error_code ec;
        std::filesystem::remove_all(path, ec);
    }
    std::string write(const std::string & name, const std::string & text) const {
        std::ofstream(path / name) << text;
        return (path / name).string();
    }
};

std::string error_of(const std::function<void()> & f) {
    try {
        f();
    } catch (const std::runtime_error & e) {
        return e.what();
    }
    return "(no error)";
}

TEST(Security, CertificatesRoundTripInTheFormatCzmqAndPyzmqUse) {
    const CurveCert c = new_curve_cert();
    ASSERT_TRUE(is_z85_key(c.public_key));
    ASSERT_TRUE(is_z85_key(c.secret_key));
    Scratch dir;
    const auto [pub, sec] = write_curve_cert(dir.path.string(), "server", c);
    EXPECT_EQ(pub, (dir.path / "server.key").string());
    EXPECT_EQ(sec, (dir.path / "server.key_secret").string());
    struct stat st{};
    ASSERT_EQ(::stat(sec.c_str(), &st), 0);
    EXPECT_EQ(st.st_mode & 0777, 0600u) << "the secret certificate is private";
    const CurveCert p = load_curve_cert(pub, false);
    EXPECT_EQ(p.public_key, c.public_key);
    EXPECT_EQ(p.secret_key, "");
    const CurveCert s = load_curve_cert(sec, true);
    EXPECT_EQ(s.public_key, c.public_key);
    EXPECT_EQ(s.secret_key, c.secret_key);
    EXPECT_NE(error_of([&] { load_curve_cert(pub, true); }).find("no secret key"), std::string::npos);
    EXPECT_NE(error_of([&] { write_curve_cert(dir.path.string(), "server", c); }).find("File exists"), std::string::npos)
        << "an existing key is never overwritten";
    EXPECT_NE(error_of([&] { write_curve_cert(dir.path.string(), "../x", c); }).find("file name"), std::string::npos);

    // A certificate as pyzmq's zmq.auth.create_certificates writes it (metadata, quoted keys),
    // with the RFC 32 test vector's key pair.
    const std::string pyzmq = "#   ****  Generated on 2026-11-30 by pyzmq  ****\n"
                              "#   ZeroMQ CURVE **Secret** Certificate\n\nmetadata\n    name = \"x\"\ncurve\n"
                              "    public-key = \"rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7\"\n"
                              "    secret-key = \"JTKVSB%%)wK0E.X)V>+}o?pNmC{O&4W4b!Ni{Lh6\"\n";
    const CurveCert v = parse_curve_cert(pyzmq, "vector", true);
    EXPECT_EQ(v.public_key, "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7") << "the secret key's public key";
    // A bare key on a line of its own; a '#' inside a key is not a comment.
    EXPECT_EQ(parse_curve_cert("\n  JTKVSB%%)wK0E.X)V>+}o?pNmC{O&4W4b!Ni{Lh6  \n", "bare", true).public_key, v.public_key);
    EXPECT_EQ(parse_curve_cert("# a comment\nAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA#A\n", "hash", false).public_key,
              "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA#A");
}

TEST(Security, BadCertificatesAndKeyListsNameTheFileLineAndProblem) {
    const std::string good = "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7";
    auto err = [](std::string_view text, bool secret) { return error_of([&] { parse_curve_cert(text, "c.key", secret); }); };
    EXPECT_EQ(err("curve\n    public-key = \"short\"\n", false), "c.key:2: a key is 40 Z85 characters; this is 5: \"short\"");
    EXPECT_NE(err("public-key = \"rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf\\\"\"\n", false).find("c.key:1: "), std::string::npos);
    EXPECT_NE(err("public-key = \"" + good + "\"\npublic-key = \"" + good + "\"\n", false).find("c.key:2: public-key given twice"),
              std::string::npos);
    EXPECT_NE(err("public-key = \"" + good + "\"\nsecret-key = \"JTKVSB%%)wK0E.X)V>+}o?pNmC{O&4W4b!Ni{Lh7\"\n", true)
                  .find("c.key:1: public-key is not the secret key's public key"),
              std::string::npos);
    EXPECT_NE(err("hello\n", false).find("c.key:1: neither a key nor a certificate line"), std::string::npos);
    EXPECT_NE(err("", false).find("c.key: no key"), std::string::npos);
    EXPECT_NE(err(std::string("public-key = \"\x01\xff") + std::string(38, 'a') + "\"\n", false).find("\\x01\\xff"), std::string::npos)
        << "binary is shown escaped";

    EXPECT_FALSE(is_z85_key(std::string(40, '#'))) << "a group over 32 bits";
    EXPECT_FALSE(is_z85_key(std::string("Bearerk-fu") + std::string(10, '\0') + "zz-0123456788abcdef")) << "a NUL (fuzz find)";
    EXPECT_EQ(parse_key_list("# clients\n" + good + "\n\n  " + good + "  \n", "keys").size(), 2u);
    EXPECT_EQ(error_of([] { parse_key_list("# nobody\n", "keys"); }), "keys: no keys: every client would be refused");
    EXPECT_NE(error_of([&] { parse_key_list(good + "\n" + good.substr(1) + "~\n", "keys"); }).find("keys:2: not a Z85 key"), std::string::npos);

    Scratch dir;
    EXPECT_NE(error_of([&] { load_authorized_keys(dir.path.string()); }).find("no *.key certificates"), std::string::npos);
    write_curve_cert(dir.path.string(), "alice", new_curve_cert());
    write_curve_cert(dir.path.string(), "bob", new_curve_cert());
    EXPECT_EQ(load_authorized_keys(dir.path.string()).size(), 2u) << "a folder's *.key files, not its *.key_secret ones";
    dir.write("broken.key", "public-key = \"nope\"\n");
    EXPECT_NE(error_of([&] { load_authorized_keys(dir.path.string()); }).find("broken.key:1:"), std::string::npos);
    EXPECT_NE(error_of([&] { load_curve_cert((dir.path / "missing").string(), true); }).find("cannot read the certificate"),
              std::string::npos);
}

TEST(Security, ApiKeysAreCheckedWholeAndTheirFileStrictly) {
    const auto keys = parse_api_keys("# team keys\nsk-first-0123456789abc\n\nsk-second-0123456789ab\n", "keys.txt");
    ASSERT_EQ(keys.size(), 2u);
    EXPECT_EQ(check_api_key(keys, "Bearer sk-first-0123456789abc"), ApiKeyCheck::Ok);
    EXPECT_EQ(check_api_key(keys, "bearer   sk-second-0123456789ab "), ApiKeyCheck::Ok);
    EXPECT_EQ(check_api_key(keys, "Bearer sk-first-0123456789ab"), ApiKeyCheck::Wrong) << "a prefix of a key";
    EXPECT_EQ(check_api_key(keys, "Bearer sk-first-0123456789abcd"), ApiKeyCheck::Wrong) << "a key and more";
    EXPECT_EQ(check_api_key(keys, "Bearer sk-first-0123456789abC"), ApiKeyCheck::Wrong);
    EXPECT_EQ(check_api_key(keys, ""), ApiKeyCheck::Missing);
    EXPECT_EQ(check_api_key(keys, "Basic dXNlcjpwYXNz"), ApiKeyCheck::Malformed);
    EXPECT_EQ(check_api_key(keys, "Bearer"), ApiKeyCheck::Malformed);
    EXPECT_EQ(check_api_key(keys, "sk-first-0123456789abc"), ApiKeyCheck::Malformed);

    EXPECT_EQ(error_of([] { parse_api_keys("short\n", "k"); }), "k:1: an API key is 16 to 512 characters; this one is 5");
    EXPECT_NE(error_of([] { parse_api_keys("# x\nsk-with space-0123456789\n", "k"); }).find("k:2: an API key is visible ASCII"),
              std::string::npos);
    EXPECT_EQ(error_of([] { parse_api_keys("\n# none\n", "k"); }), "k: no API keys: every request would be refused");
}

struct Log {   // what the ZAP handler's thread reports
    std::mutex mu;
    std::vector<std::string> lines;
    std::string first() {
        std::lock_guard<std::mutex> lock(mu);
        return lines.empty() ? "" : lines.front();
    }
};

// A ROUTER with CURVE and a ZAP handler, answering every request with a pong frame.
struct CurveRouter {
    zmq::context_t ctx{1};
    std::unique_ptr<ZapHandler> zap;
    zmq::socket_t sock;
    std::string endpoint;
    std::atomic<bool> stop{false};
    std::thread thread;
    CurveRouter(const CurveCert & server, std::vector<std::string> allowed, Log * log) {
        zap = std::make_unique<ZapHandler>(ctx, std::move(allowed), [log](const std::string & s) {
            std::lock_guard<std::mutex> lock(log->mu);
            log->lines.push_back(s);
        });
        sock = zmq::socket_t(ctx, zmq::socket_type::router);
        sock.set(zmq::sockopt::linger, 0);
        sock.set(zmq::sockopt::curve_server, true);
        sock.set(zmq::sockopt::curve_secretkey, server.secret_key);
        sock.bind("tcp://127.0.0.1:*");
        endpoint = sock.get(zmq::sockopt::last_endpoint);
        thread = std::thread([this] {
            while (!stop) {
                zmq::pollitem_t item{sock.handle(), 0, ZMQ_POLLIN, 0};
                if (zmq::poll(&item, 1, 50ms) <= 0) continue;
                std::vector<zmq::message_t> parts;
                if (!zmq::recv_multipart(sock, std::back_inserter(parts))) continue;
                sock.send(parts.front(), zmq::send_flags::sndmore);
                sock.send(zmq::str_buffer("{\"type\":\"pong\",\"id\":\"p\",\"info\":{}}"));
            }
        });
    }
    ~CurveRouter() {
        stop = true;
        thread.join();
        sock.close();
        zap.reset();
    }
};

TEST(Security, ZapHandlerLetsInListedKeysOnlyAndClientsSayWhy) {
    const CurveCert server = new_curve_cert(), alice = new_curve_cert(), mallory = new_curve_cert();
    Log log;
    CurveRouter r(server, {alice.public_key}, &log);
    const nlohmann::json ping = {{"type", "ping"}, {"id", "p"}};
    {
        Client c(r.endpoint, {server.public_key, alice.secret_key});
        EXPECT_EQ(c.curve_public_key(), alice.public_key);
        auto f = c.request(ping, 10s);
        ASSERT_TRUE(f.has_value()) << c.connection_note();
        EXPECT_EQ(f->type, "pong");
    }
    const std::string refused = error_of([&] {
        Client c(r.endpoint, {server.public_key, mallory.secret_key});
        c.request(ping, 10s);
    });
    EXPECT_NE(refused.find("refused this client's CURVE key"), std::string::npos) << refused;
    EXPECT_NE(refused.find(mallory.public_key), std::string::npos) << "the key to add is named";
    const std::string plain = error_of([&] {
        Client c(r.endpoint);
        c.request(ping, 10s);
    });
    EXPECT_NE(plain.find("require"), std::string::npos) << plain;
    const std::string wrong_server = error_of([&] {
        Client c(r.endpoint, {alice.public_key, alice.secret_key});
        c.request(ping, 10s);
    });
    EXPECT_NE(wrong_server.find("handshake"), std::string::npos) << wrong_server;
    EXPECT_GE(r.zap->denied(), 1u);
    EXPECT_EQ(r.zap->allowed(), 1u);
    r.zap->set_allowed({alice.public_key, mallory.public_key});   // a reload (SIGHUP) lets mallory in
    {
        Client c(r.endpoint, {server.public_key, mallory.secret_key});
        auto f = c.request(ping, 10s);
        ASSERT_TRUE(f.has_value()) << c.connection_note();
        EXPECT_EQ(f->type, "pong");
    }
    // The refusal is logged (at most once a second; the handler reports the rest when it stops).
    const auto deadline = std::chrono::steady_clock::now() + 5s;
    while (log.first().empty() && std::chrono::steady_clock::now() < deadline) std::this_thread::sleep_for(20ms);
    EXPECT_NE(log.first().find(mallory.public_key), std::string::npos) << log.first();
    EXPECT_THROW(Client("tcp://127.0.0.1:1", {"not a key", ""}), std::runtime_error);
}

} // namespace
} // namespace moesh::security
