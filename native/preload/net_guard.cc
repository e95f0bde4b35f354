// microvm-netguard.so: the egress filter of the QEMU backend, LD_PRELOADed into QEMU when an egress
// policy has rules QEMU's restricted mode cannot express (CIDRs, wildcard or port-less names, deny
// rules, a resolver): docs/security.md, "Network egress".
//
// Everything a guest sends out of QEMU's user-mode network leaves through a socket libslirp opens
// in the QEMU process: connect() for TCP, sendto()/sendmsg() for UDP and ICMP. This library wraps
// those calls (and recvfrom()/recvmsg() for DNS answers) and decides each one against the policy,
// outside the guest's reach: a guest that connects to a raw address, changes its routes, resolver
// or MTU still goes through these calls.
//   - TCP: connect() to a refused destination fails with ECONNREFUSED (libslirp answers the guest
//     with a reset at once).
//   - UDP/ICMP: a refused datagram is dropped (EACCES to libslirp).
//   - DNS (UDP to port 53, any server): the question's name is checked; a refused name gets an
//     NXDOMAIN answer made here (sent to libslirp's socket from a loopback socket of this library,
//     whose source recvfrom() then reports as the server the guest asked); an allowed one goes to
//     the policy's resolver (or where the guest sent it). The A/AAAA records of answers to allowed
//     names are remembered, for their TTL (60 s - 1 h), as the addresses those names allow.
// Decisions go to the VM's egress log as JSON lines (what lib/network/egress-audit.ts reads):
// connects and DNS answers both ways, refused datagrams at most once a second per destination;
// the log stops growing at 16 MiB.
//
// The policy comes from the file named by MICROVM_NETGUARD_POLICY (written by the host, 0600):
//   default allow|deny
//   log <path>
//   ready <path>                      written "ok" (or "error <why>") when the policy is loaded
//   upstream <ip> <port>              where allowed DNS questions go
//   rule allow|deny cidr <ip>/<bits> <port|0> any|tcp|udp <label>
//   rule allow|deny host <name> <port|0> any|tcp|udp <label>
//   rule allow|deny suffix <.name> <port|0> any|tcp|udp <label>
// Any line it cannot read makes every inet connection and datagram refused (fail closed). Deny
// rules are checked first, then allow rules, then the default. The host itself (loopback,
// link-local; QEMU's gateway arrives as loopback) is refused under any policy unless an address
// rule names it, and DNS answers never teach such addresses. LD_PRELOAD and the policy variable
// are removed from the environment at load, so QEMU's children (the allow-list relays) run without.
//
// The libkrun runner links this file too (MICROVM_NETGUARD_LINKED; its exported connect() and
// friends are what libkrun, loaded later, calls for the guest's TSI sockets). There, no policy
// variable means no policy: every call passes straight through.
#include <arpa/inet.h>
#include <dlfcn.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

namespace {

using ConnectFn = int (*)(int, const struct sockaddr*, socklen_t);
using SendtoFn = ssize_t (*)(int, const void*, size_t, int, const struct sockaddr*, socklen_t);
using SendmsgFn = ssize_t (*)(int, const struct msghdr*, int);
using RecvfromFn = ssize_t (*)(int, void*, size_t, int, struct sockaddr*, socklen_t*);
using RecvmsgFn = ssize_t (*)(int, struct msghdr*, int);

ConnectFn real_connect;
SendtoFn real_sendto;
SendmsgFn real_sendmsg;
RecvfromFn real_recvfrom;
RecvmsgFn real_recvmsg;

constexpr int kAny = 0, kTcp = 6, kUdp = 17, kIcmp = 1;
constexpr size_t kMaxLearned = 4096;
constexpr long long kMaxLogBytes = 16LL << 20;

// An address, IPv4 as IPv4 (v4-mapped IPv6 addresses are turned into it).
struct Addr {
  int family = 0;
  uint8_t bytes[16] = {0};
  int port = 0;
};

struct Rule {
  bool allow = false;
  enum Kind { kCidr, kHost, kSuffix } kind = kCidr;
  Addr net;
  int bits = 0;
  std::string name;  // host: the name; suffix: ".example.com"
  int port = 0;      // 0: any
  int proto = kAny;
  std::string label;
};

struct Learned {
  Addr addr;
  std::string name;
  long long expiry_ns;
};

struct DnsDest {
  int fd;
  struct sockaddr_storage dest;
  socklen_t len;
};

struct Limit {
  Addr addr;
  int proto;
  long long at_ns;
};

std::mutex g_mu;
bool g_ok = false;
bool g_passthrough = false;  // the runner without a policy
bool g_default_allow = false;
bool g_has_upstream = false;
struct sockaddr_storage g_upstream;
socklen_t g_upstream_len = 0;
// The lists are function-local statics: the constructor below may run before this file's dynamic
// initializers, which would empty lists filled by it.
std::vector<Rule>& Rules() {
  static std::vector<Rule> v;
  return v;
}
std::vector<Learned>& LearnedList() {
  static std::vector<Learned> v;
  return v;
}
std::vector<DnsDest>& DnsDests() {  // per libslirp socket: the server its last question was for
  static std::vector<DnsDest> v;
  return v;
}
std::vector<Limit>& Limits() {
  static std::vector<Limit> v;
  return v;
}
int g_log_fd = -1;
long long g_log_bytes = 0;
int g_fake_fd = -1;  // NXDOMAIN answers come from here (127.0.0.1, an ephemeral port)
struct sockaddr_in g_fake_addr;
int g_fake6_fd = -1;  // the same for questions from IPv6 sockets ([::1])
struct sockaddr_in6 g_fake6_addr;

long long Now(clockid_t clock) {
  struct timespec ts;
  clock_gettime(clock, &ts);
  return static_cast<long long>(ts.tv_sec) * 1000000000LL + ts.tv_nsec;
}

bool ToAddr(const struct sockaddr* sa, socklen_t len, Addr* out) {
  if (sa == nullptr) return false;
  if (sa->sa_family == AF_INET && len >= static_cast<socklen_t>(sizeof(struct sockaddr_in))) {
    const auto* in = reinterpret_cast<const struct sockaddr_in*>(sa);
    out->family = AF_INET;
    std::memcpy(out->bytes, &in->sin_addr, 4);
    out->port = ntohs(in->sin_port);
    return true;
  }
  if (sa->sa_family == AF_INET6 && len >= static_cast<socklen_t>(sizeof(struct sockaddr_in6))) {
    const auto* in6 = reinterpret_cast<const struct sockaddr_in6*>(sa);
    out->port = ntohs(in6->sin6_port);
    if (IN6_IS_ADDR_V4MAPPED(&in6->sin6_addr)) {
      out->family = AF_INET;
      std::memcpy(out->bytes, in6->sin6_addr.s6_addr + 12, 4);
    } else {
      out->family = AF_INET6;
      std::memcpy(out->bytes, in6->sin6_addr.s6_addr, 16);
    }
    return true;
  }
  return false;
}

std::string AddrText(const Addr& a) {
  char buf[INET6_ADDRSTRLEN] = {0};
  inet_ntop(a.family, a.bytes, buf, sizeof buf);
  return buf;
}

bool SameIp(const Addr& a, const Addr& b) {
  return a.family == b.family && std::memcmp(a.bytes, b.bytes, a.family == AF_INET ? 4 : 16) == 0;
}

bool InNet(const Addr& a, const Addr& net, int bits) {
  if (a.family != net.family) return false;
  int full = bits / 8, rest = bits % 8;
  if (std::memcmp(a.bytes, net.bytes, static_cast<size_t>(full)) != 0) return false;
  if (rest == 0) return true;
  uint8_t mask = static_cast<uint8_t>(0xff << (8 - rest));
  return (a.bytes[full] & mask) == (net.bytes[full] & mask);
}

bool NameMatches(const Rule& r, const std::string& name) {
  if (r.kind == Rule::kHost) return name == r.name;
  if (r.kind == Rule::kSuffix)
    return name.size() > r.name.size() && name.compare(name.size() - r.name.size(), r.name.size(), r.name) == 0;
  return false;
}

const char* ProtoName(int proto) {
  return proto == kTcp ? "tcp" : proto == kUdp ? "udp" : proto == kIcmp ? "icmp" : "any";
}

// Names as they go into the log: only what a host name has; anything else was refused already.
bool CleanName(const std::string& s) {
  if (s.empty() || s.size() > 253) return false;
  for (char c : s) {
    if (!((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-' || c == '.' || c == '_')) return false;
  }
  return true;
}

// One JSON line on the egress log (g_mu held). host/kind/error/rule are plain ASCII by construction.
void Log(const std::string& host, int port, const std::string& address, bool ok, const char* error,
         const std::string& rule, int proto, const char* kind) {
  if (g_log_fd < 0 || g_log_bytes >= kMaxLogBytes) return;
  long long ns = Now(CLOCK_REALTIME);
  time_t secs = static_cast<time_t>(ns / 1000000000LL);
  struct tm tm;
  gmtime_r(&secs, &tm);
  char when[96];
  std::snprintf(when, sizeof when, "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ", tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday,
                tm.tm_hour, tm.tm_min, tm.tm_sec, static_cast<int>((ns / 1000000LL) % 1000));
  std::string line = std::string("{\"time\":\"") + when + "\",\"host\":\"" + host +
                     "\",\"port\":" + std::to_string(port) +
                     ",\"address\":" + (address.empty() ? std::string("null") : "\"" + address + "\"") +
                     ",\"ok\":" + (ok ? "true" : "false");
  if (error != nullptr) line += std::string(",\"error\":\"") + error + "\"";
  line += ",\"rule\":\"" + rule + "\",\"protocol\":\"" + ProtoName(proto) + "\",\"kind\":\"" + kind + "\"}\n";
  ssize_t w = write(g_log_fd, line.data(), line.size());
  if (w > 0) g_log_bytes += w;
}

// The names the answers taught us for this address (g_mu held; drops the expired ones).
std::vector<std::string> NamesOf(const Addr& a) {
  const long long now = Now(CLOCK_MONOTONIC);
  std::vector<std::string> out;
  size_t keep = 0;
  for (size_t i = 0; i < LearnedList().size(); i++) {
    if (LearnedList()[i].expiry_ns <= now) continue;
    if (SameIp(LearnedList()[i].addr, a)) out.push_back(LearnedList()[i].name);
    LearnedList()[keep++] = LearnedList()[i];
  }
  LearnedList().resize(keep);
  return out;
}

// The host itself: loopback, unspecified and link-local addresses (QEMU's gateway 10.0.2.2 and its
// IPv6 twin fec0::2 reach libslirp's calls as 127.0.0.1 and ::1).
bool HostLocal(const Addr& a) {
  const uint8_t* b = a.bytes;
  if (a.family == AF_INET) return b[0] == 127 || b[0] == 0 || (b[0] == 169 && b[1] == 254);
  static const uint8_t kZero[16] = {0};
  if (std::memcmp(b, kZero, 15) == 0 && (b[15] == 0 || b[15] == 1)) return true;  // :: and ::1
  return b[0] == 0xfe && (b[1] & 0xc0) == 0x80;                                   // fe80::/10
}

// QEMU's own user networks (10.0.2.0/24, fec0::/64): what a DNS answer may not teach.
bool QemuNet(const Addr& a) {
  if (a.family == AF_INET) return a.bytes[0] == 10 && a.bytes[1] == 0 && a.bytes[2] == 2;
  static const uint8_t kFec0[8] = {0xfe, 0xc0, 0, 0, 0, 0, 0, 0};
  return std::memcmp(a.bytes, kFec0, 8) == 0;
}

// The verdict on a connection or datagram to `a` (g_mu held); `rule` gets the deciding rule's label.
bool Decide(const Addr& a, int proto, std::string* rule, std::string* name) {
  if (!g_ok) {
    *rule = "guard-not-loaded";
    return false;
  }
  if (HostLocal(a)) {
    // The host is reachable only through a rule that names it by address (a CIDR narrower than a
    // default route), whatever the default or a name's DNS answers say; deny rules still win.
    for (int pass = 0; pass < 2; pass++) {
      for (const Rule& r : Rules()) {
        if (r.allow != (pass == 1) || r.kind != Rule::kCidr || r.bits == 0) continue;
        if ((r.port != 0 && r.port != a.port) || (r.proto != kAny && r.proto != proto)) continue;
        if (InNet(a, r.net, r.bits)) {
          *rule = r.label;
          return r.allow;
        }
      }
    }
    *rule = "host";
    return false;
  }
  std::vector<std::string> names = NamesOf(a);
  if (!names.empty()) *name = names[0];
  for (int pass = 0; pass < 2; pass++) {
    const bool allow = pass == 1;
    for (const Rule& r : Rules()) {
      if (r.allow != allow) continue;
      if (r.port != 0 && r.port != a.port) continue;
      if (r.proto != kAny && r.proto != proto) continue;
      bool hit = false;
      if (r.kind == Rule::kCidr) {
        hit = InNet(a, r.net, r.bits);
      } else {
        for (const auto& n : names) {
          if (NameMatches(r, n)) {
            hit = true;
            *name = n;
            break;
          }
        }
      }
      if (hit) {
        *rule = r.label;
        return allow;
      }
    }
  }
  *rule = "default";
  return g_default_allow;
}

// Whether a DNS question for `name` is answered (g_mu held).
bool NameAllowed(const std::string& name, std::string* rule) {
  if (!g_ok) {
    *rule = "guard-not-loaded";
    return false;
  }
  for (int pass = 0; pass < 2; pass++) {
    for (const Rule& r : Rules()) {
      if (r.allow != (pass == 1) || r.kind == Rule::kCidr) continue;
      if (NameMatches(r, name)) {
        *rule = r.label;
        return r.allow;
      }
    }
  }
  *rule = "default";
  return g_default_allow;
}

// The question's name (lowercase, no final dot) and where the question ends; false if malformed.
bool ParseQuestion(const uint8_t* p, size_t n, std::string* name, size_t* end) {
  if (n < 12) return false;
  const int qd = (p[4] << 8) | p[5];
  if (qd != 1) return false;
  size_t i = 12;
  name->clear();
  for (int labels = 0;; labels++) {
    if (i >= n || labels > 127) return false;
    const size_t len = p[i++];
    if (len == 0) break;
    if (len > 63 || i + len > n) return false;  // compression has no place in a question
    if (!name->empty()) name->push_back('.');
    for (size_t k = 0; k < len; k++) {
      char c = static_cast<char>(p[i + k]);
      if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
      name->push_back(c);
    }
    i += len;
  }
  if (i + 4 > n) return false;
  *end = i + 4;
  return !name->empty() && CleanName(*name);
}

// Skips a (possibly compressed) name in an answer; false if malformed.
bool SkipName(const uint8_t* p, size_t n, size_t* i) {
  for (int hops = 0; hops < 128; hops++) {
    if (*i >= n) return false;
    const uint8_t len = p[*i];
    if ((len & 0xc0) == 0xc0) {
      if (*i + 2 > n) return false;
      *i += 2;
      return true;
    }
    if (len & 0xc0) return false;
    *i += 1 + len;
    if (len == 0) return true;
  }
  return false;
}

// An answer from a resolver: remember the addresses of an allowed name (g_mu held).
void Learn(const uint8_t* p, size_t n) {
  std::string name, rule;
  size_t i = 0;
  if (!ParseQuestion(p, n, &name, &i) || !(p[2] & 0x80)) return;
  if (!NameAllowed(name, &rule)) return;
  const int an = std::min((p[6] << 8) | p[7], 64);
  const long long now = Now(CLOCK_MONOTONIC);
  for (int k = 0; k < an; k++) {
    if (!SkipName(p, n, &i) || i + 10 > n) return;
    const int type = (p[i] << 8) | p[i + 1];
    const long long ttl = (static_cast<long long>(p[i + 4]) << 24) | (p[i + 5] << 16) | (p[i + 6] << 8) | p[i + 7];
    const size_t rdlen = static_cast<size_t>((p[i + 8] << 8) | p[i + 9]);
    i += 10;
    if (i + rdlen > n) return;
    Addr a;
    if (type == 1 && rdlen == 4) {
      a.family = AF_INET;
      std::memcpy(a.bytes, p + i, 4);
    } else if (type == 28 && rdlen == 16) {
      a.family = AF_INET6;
      std::memcpy(a.bytes, p + i, 16);
    }
    i += rdlen;
    // An answer never opens the host or QEMU's own networks (a name pointing at 127.0.0.1, 10.0.2.2).
    if (a.family == 0 || HostLocal(a) || QemuNet(a)) continue;
    const long long keep_s = std::max(60LL, std::min(ttl, 3600LL));
    if (LearnedList().size() >= kMaxLearned) LearnedList().erase(LearnedList().begin());
    LearnedList().push_back({a, name, now + keep_s * 1000000000LL});
  }
}

int SocketType(int fd, int* proto) {
  int type = 0, protocol = 0;
  socklen_t len = sizeof type;
  getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len);
  len = sizeof protocol;
  getsockopt(fd, SOL_SOCKET, SO_PROTOCOL, &protocol, &len);
  *proto = type == SOCK_STREAM                                                            ? kTcp
           : (protocol == IPPROTO_ICMP || protocol == IPPROTO_ICMPV6 || type == SOCK_RAW) ? kIcmp
                                                                                          : kUdp;
  return type;
}

void RememberDest(int fd, const struct sockaddr* dest, socklen_t len) {
  for (auto& d : DnsDests()) {
    if (d.fd == fd) {
      std::memcpy(&d.dest, dest, std::min<size_t>(len, sizeof d.dest));
      d.len = len;
      return;
    }
  }
  if (DnsDests().size() >= 1024) DnsDests().erase(DnsDests().begin());
  DnsDest d{fd, {}, len};
  std::memcpy(&d.dest, dest, std::min<size_t>(len, sizeof d.dest));
  DnsDests().push_back(d);
}

// A DNS question leaving libslirp's socket `fd` for `dest`. Returns what sendto returns.
ssize_t DnsOut(int fd, const uint8_t* q, size_t n, int flags, const struct sockaddr* dest, socklen_t dlen) {
  std::unique_lock<std::mutex> lock(g_mu);
  std::string name, rule;
  size_t qend = 0;
  const bool parsed = ParseQuestion(q, n, &name, &qend);
  const bool allowed = parsed && NameAllowed(name, &rule);
  if (!parsed) rule = "malformed";
  Log(parsed ? name : "-", 53, "", allowed, allowed ? nullptr : "ENOTFOUND", rule, kUdp, "dns");
  if (allowed) {
    if (!g_has_upstream) {
      lock.unlock();
      return real_sendto(fd, q, n, flags, dest, dlen);
    }
    RememberDest(fd, dest, dlen);
    struct sockaddr_storage up = g_upstream;
    socklen_t up_len = g_upstream_len;
    lock.unlock();
    return real_sendto(fd, q, n, flags, reinterpret_cast<struct sockaddr*>(&up), up_len);
  }
  if (!parsed || g_fake_fd < 0) {
    errno = EACCES;
    return -1;
  }
  // NXDOMAIN: the question back with QR, RA and RCODE 3, sent to the socket from our loopback one.
  struct sockaddr_storage local;
  socklen_t llen = sizeof local;
  std::memset(&local, 0, sizeof local);
  if (getsockname(fd, reinterpret_cast<struct sockaddr*>(&local), &llen) != 0) return -1;
  const bool v6 = local.ss_family == AF_INET6;
  const bool unbound = v6 ? reinterpret_cast<struct sockaddr_in6*>(&local)->sin6_port == 0
                          : reinterpret_cast<struct sockaddr_in*>(&local)->sin_port == 0;
  if (unbound) {
    // Never sent from yet: bind it to an ephemeral port on all addresses, as sendto would have.
    struct sockaddr_storage any {};
    any.ss_family = local.ss_family;
    if (bind(fd, reinterpret_cast<struct sockaddr*>(&any),
             v6 ? sizeof(struct sockaddr_in6) : sizeof(struct sockaddr_in)) != 0)
      return -1;
    llen = sizeof local;
    getsockname(fd, reinterpret_cast<struct sockaddr*>(&local), &llen);
  }
  if ((v6 && g_fake6_fd < 0) || (!v6 && local.ss_family != AF_INET)) {
    errno = EACCES;  // no loopback socket to answer from: dropped (the resolver retries or gives up)
    return -1;
  }
  std::vector<uint8_t> answer(q, q + qend);
  answer[2] = static_cast<uint8_t>(0x80 | (q[2] & 0x79));  // QR, opcode, RD
  answer[3] = 0x83;                                        // RA, NXDOMAIN
  for (int k = 6; k < 12; k++) answer[k] = 0;
  RememberDest(fd, dest, dlen);
  if (v6) {
    struct sockaddr_in6 to = *reinterpret_cast<struct sockaddr_in6*>(&local);
    to.sin6_addr = in6addr_loopback;
    real_sendto(g_fake6_fd, answer.data(), answer.size(), 0, reinterpret_cast<struct sockaddr*>(&to), sizeof to);
  } else {
    struct sockaddr_in to = *reinterpret_cast<struct sockaddr_in*>(&local);
    to.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    real_sendto(g_fake_fd, answer.data(), answer.size(), 0, reinterpret_cast<struct sockaddr*>(&to), sizeof to);
  }
  return static_cast<ssize_t>(n);
}

// After a receive on `fd`: answers from the upstream or from our NXDOMAIN socket are shown as from
// the server the question was for; answers to allowed names teach their addresses.
void AfterReceive(int fd, const void* buf, ssize_t n, struct sockaddr* from, socklen_t* from_len) {
  if (n <= 0 || from == nullptr || from_len == nullptr) return;
  Addr src;
  if (!ToAddr(from, *from_len, &src)) return;
  std::lock_guard<std::mutex> lock(g_mu);
  Addr fake, fake6, up;
  ToAddr(reinterpret_cast<struct sockaddr*>(&g_fake_addr), sizeof g_fake_addr, &fake);
  ToAddr(reinterpret_cast<struct sockaddr*>(&g_fake6_addr), sizeof g_fake6_addr, &fake6);
  const bool from_fake = (g_fake_fd >= 0 && SameIp(src, fake) && src.port == fake.port) ||
                         (g_fake6_fd >= 0 && SameIp(src, fake6) && src.port == fake6.port);
  const bool from_up = g_has_upstream && ToAddr(reinterpret_cast<struct sockaddr*>(&g_upstream), g_upstream_len, &up) &&
                       SameIp(src, up) && src.port == up.port;
  if (from_fake || from_up) {
    for (const auto& d : DnsDests()) {
      if (d.fd == fd && *from_len >= d.len) {
        std::memcpy(from, &d.dest, d.len);
        *from_len = d.len;
        break;
      }
    }
  }
  if ((src.port == 53 || from_up) && !from_fake) Learn(static_cast<const uint8_t*>(buf), static_cast<size_t>(n));
}

// Datagram verdicts, logged at most once a second per destination (g_mu held).
bool DatagramAllowed(const Addr& a, int proto) {
  std::string rule, name;
  const bool ok = Decide(a, proto, &rule, &name);
  if (ok) return true;
  const long long now = Now(CLOCK_MONOTONIC);
  for (auto& l : Limits()) {
    if (SameIp(l.addr, a) && l.addr.port == a.port && l.proto == proto) {
      if (now - l.at_ns < 1000000000LL) return false;
      l.at_ns = now;
      Log(name.empty() ? AddrText(a) : name, a.port, AddrText(a), false, "EACCES", rule, proto, "datagram");
      return false;
    }
  }
  if (Limits().size() >= 256) Limits().erase(Limits().begin());
  Limits().push_back({a, proto, now});
  Log(name.empty() ? AddrText(a) : name, a.port, AddrText(a), false, "EACCES", rule, proto, "datagram");
  return false;
}

bool ParseAddr(const char* text, Addr* out) {
  if (inet_pton(AF_INET, text, out->bytes) == 1) {
    out->family = AF_INET;
    return true;
  }
  if (inet_pton(AF_INET6, text, out->bytes) == 1) {
    out->family = AF_INET6;
    return true;
  }
  return false;
}

// Reads the policy file; false (and `why`) on anything unexpected.
bool LoadPolicy(const char* path, std::string* log_path, std::string* ready_path, std::string* why) {
  int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
  if (fd < 0) {
    *why = std::string("cannot open the policy: ") + std::strerror(errno);
    return false;
  }
  std::string text;
  char buf[4096];
  ssize_t got;
  while ((got = read(fd, buf, sizeof buf)) > 0 && text.size() < (1 << 20)) text.append(buf, static_cast<size_t>(got));
  close(fd);
  bool have_default = false;
  size_t start = 0;
  while (start < text.size()) {
    size_t end = text.find('\n', start);
    if (end == std::string::npos) end = text.size();
    const std::string line = text.substr(start, end - start);
    start = end + 1;
    if (line.empty()) continue;
    char a[512] = {0}, b[512] = {0}, c[512] = {0}, d[16] = {0}, e[128] = {0};
    int port = 0;
    if (std::sscanf(line.c_str(), "default %15s", d) == 1) {
      if (std::strcmp(d, "allow") != 0 && std::strcmp(d, "deny") != 0) return *why = "bad default", false;
      g_default_allow = std::strcmp(d, "allow") == 0;
      have_default = true;
    } else if (line.compare(0, 4, "log ") == 0) {
      *log_path = line.substr(4);
    } else if (line.compare(0, 6, "ready ") == 0) {
      *ready_path = line.substr(6);
    } else if (std::sscanf(line.c_str(), "upstream %63s %d", a, &port) == 2) {
      Addr up;
      if (!ParseAddr(a, &up) || port < 1 || port > 65535) return *why = "bad upstream", false;
      std::memset(&g_upstream, 0, sizeof g_upstream);
      if (up.family == AF_INET) {
        auto* in = reinterpret_cast<struct sockaddr_in*>(&g_upstream);
        in->sin_family = AF_INET;
        in->sin_port = htons(static_cast<uint16_t>(port));
        std::memcpy(&in->sin_addr, up.bytes, 4);
        g_upstream_len = sizeof(struct sockaddr_in);
      } else {
        auto* in6 = reinterpret_cast<struct sockaddr_in6*>(&g_upstream);
        in6->sin6_family = AF_INET6;
        in6->sin6_port = htons(static_cast<uint16_t>(port));
        std::memcpy(&in6->sin6_addr, up.bytes, 16);
        g_upstream_len = sizeof(struct sockaddr_in6);
      }
      g_has_upstream = true;
    } else if (std::sscanf(line.c_str(), "rule %15s %15s %300s %d %15s %127s", d, c, a, &port, b, e) == 6) {
      Rule r;
      r.allow = std::strcmp(d, "allow") == 0;
      if (!r.allow && std::strcmp(d, "deny") != 0) return *why = "bad rule verdict", false;
      if (port < 0 || port > 65535) return *why = "bad rule port", false;
      r.port = port;
      r.proto = std::strcmp(b, "tcp") == 0 ? kTcp : std::strcmp(b, "udp") == 0 ? kUdp : kAny;
      if (r.proto == kAny && std::strcmp(b, "any") != 0) return *why = "bad rule protocol", false;
      r.label = e;
      if (r.label.find_first_not_of("abcdefghijklmnopqrstuvwxyz0123456789.[]") != std::string::npos)
        return *why = "bad rule label", false;
      if (std::strcmp(c, "cidr") == 0) {
        char* slash = std::strchr(a, '/');
        if (slash == nullptr) return *why = "bad cidr", false;
        *slash = '\0';
        r.kind = Rule::kCidr;
        r.bits = std::atoi(slash + 1);
        if (!ParseAddr(a, &r.net) || r.bits < 0 || r.bits > (r.net.family == AF_INET ? 32 : 128))
          return *why = "bad cidr", false;
      } else if (std::strcmp(c, "host") == 0 || std::strcmp(c, "suffix") == 0) {
        r.kind = c[0] == 'h' ? Rule::kHost : Rule::kSuffix;
        r.name = a;
        if (!CleanName(r.name)) return *why = "bad name", false;
      } else {
        return *why = "bad rule kind", false;
      }
      Rules().push_back(r);
    } else {
      *why = "unreadable line";
      return false;
    }
  }
  if (!have_default) return *why = "no default", false;
  return true;
}

__attribute__((constructor)) void Init() {
  real_connect = reinterpret_cast<ConnectFn>(dlsym(RTLD_NEXT, "connect"));
  real_sendto = reinterpret_cast<SendtoFn>(dlsym(RTLD_NEXT, "sendto"));
  real_sendmsg = reinterpret_cast<SendmsgFn>(dlsym(RTLD_NEXT, "sendmsg"));
  real_recvfrom = reinterpret_cast<RecvfromFn>(dlsym(RTLD_NEXT, "recvfrom"));
  real_recvmsg = reinterpret_cast<RecvmsgFn>(dlsym(RTLD_NEXT, "recvmsg"));
  const char* policy = getenv("MICROVM_NETGUARD_POLICY");
#ifdef MICROVM_NETGUARD_LINKED
  if (policy == nullptr) {
    g_passthrough = real_connect && real_sendto && real_sendmsg && real_recvfrom && real_recvmsg;
    g_ok = g_passthrough;
    return;
  }
#endif
  std::string log_path, ready_path, why;
  g_ok = policy != nullptr && real_connect && real_sendto && real_sendmsg && real_recvfrom && real_recvmsg &&
         LoadPolicy(policy, &log_path, &ready_path, &why);
  if (policy == nullptr) why = "MICROVM_NETGUARD_POLICY is not set";
  if (!log_path.empty()) {
    g_log_fd = open(log_path.c_str(), O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600);
    struct stat st;
    if (g_log_fd >= 0 && fstat(g_log_fd, &st) == 0) g_log_bytes = st.st_size;
  }
  g_fake_fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  std::memset(&g_fake_addr, 0, sizeof g_fake_addr);
  g_fake_addr.sin_family = AF_INET;
  g_fake_addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof g_fake_addr;
  if (g_fake_fd < 0 || bind(g_fake_fd, reinterpret_cast<struct sockaddr*>(&g_fake_addr), sizeof g_fake_addr) != 0 ||
      getsockname(g_fake_fd, reinterpret_cast<struct sockaddr*>(&g_fake_addr), &len) != 0) {
    if (g_fake_fd >= 0) close(g_fake_fd);
    g_fake_fd = -1;
  }
  g_fake6_fd = socket(AF_INET6, SOCK_DGRAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  std::memset(&g_fake6_addr, 0, sizeof g_fake6_addr);
  g_fake6_addr.sin6_family = AF_INET6;
  g_fake6_addr.sin6_addr = in6addr_loopback;
  len = sizeof g_fake6_addr;
  if (g_fake6_fd < 0 || bind(g_fake6_fd, reinterpret_cast<struct sockaddr*>(&g_fake6_addr), sizeof g_fake6_addr) != 0 ||
      getsockname(g_fake6_fd, reinterpret_cast<struct sockaddr*>(&g_fake6_addr), &len) != 0) {
    if (g_fake6_fd >= 0) close(g_fake6_fd);
    g_fake6_fd = -1;  // a host without IPv6 loopback: questions from IPv6 sockets are dropped
  }
  if (!ready_path.empty()) {
    int fd = open(ready_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0600);
    if (fd >= 0) {
      std::string text = g_ok ? "ok\n" : "error " + why + "\n";
      ssize_t ignored = write(fd, text.data(), text.size());
      (void)ignored;
      close(fd);
    }
  }
  unsetenv("LD_PRELOAD");
  unsetenv("MICROVM_NETGUARD_POLICY");
}

}  // namespace

extern "C" {

__attribute__((visibility("default"))) int connect(int fd, const struct sockaddr* addr, socklen_t len) {
  Addr a;
  if (g_passthrough || !ToAddr(addr, len, &a)) return real_connect(fd, addr, len);
  int proto = kTcp;
  SocketType(fd, &proto);
  std::string rule, name;
  bool ok;
  {
    std::lock_guard<std::mutex> lock(g_mu);
    ok = Decide(a, proto, &rule, &name);
    Log(name.empty() ? AddrText(a) : name, a.port, AddrText(a), ok, ok ? nullptr : "ECONNREFUSED", rule, proto,
        "connect");
  }
  if (!ok) {
    errno = ECONNREFUSED;
    return -1;
  }
  return real_connect(fd, addr, len);
}

__attribute__((visibility("default"))) ssize_t sendto(int fd, const void* buf, size_t n, int flags,
                                                      const struct sockaddr* dest, socklen_t dlen) {
  Addr a;
  if (g_passthrough || !ToAddr(dest, dlen, &a)) return real_sendto(fd, buf, n, flags, dest, dlen);
  int proto = kUdp;
  const int type = SocketType(fd, &proto);
  if (type == SOCK_DGRAM && proto == kUdp && a.port == 53)
    return DnsOut(fd, static_cast<const uint8_t*>(buf), n, flags, dest, dlen);
  {
    std::lock_guard<std::mutex> lock(g_mu);
    if (!DatagramAllowed(a, proto)) {
      errno = EACCES;
      return -1;
    }
  }
  return real_sendto(fd, buf, n, flags, dest, dlen);
}

__attribute__((visibility("default"))) ssize_t sendmsg(int fd, const struct msghdr* msg, int flags) {
  Addr a;
  if (g_passthrough || msg == nullptr ||
      !ToAddr(static_cast<const struct sockaddr*>(msg->msg_name), msg->msg_namelen, &a))
    return real_sendmsg(fd, msg, flags);
  // As sendto: the bytes gathered into one buffer (a datagram is at most 64 KiB).
  std::vector<uint8_t> all;
  for (size_t k = 0; k < msg->msg_iovlen; k++) {
    const auto* p = static_cast<const uint8_t*>(msg->msg_iov[k].iov_base);
    if (all.size() + msg->msg_iov[k].iov_len > 65536) {
      errno = EMSGSIZE;
      return -1;
    }
    all.insert(all.end(), p, p + msg->msg_iov[k].iov_len);
  }
  return sendto(fd, all.data(), all.size(), flags, static_cast<const struct sockaddr*>(msg->msg_name),
                msg->msg_namelen);
}

// Several datagrams at once: each goes through sendmsg() above (none of QEMU's or libkrun's paths
// use it today; a future one must not slip past the policy).
__attribute__((visibility("default"))) int sendmmsg(int fd, struct mmsghdr* vec, unsigned int n, int flags) {
  unsigned int sent = 0;
  for (; vec != nullptr && sent < n; sent++) {
    ssize_t r = sendmsg(fd, &vec[sent].msg_hdr, flags);
    if (r < 0) return sent > 0 ? static_cast<int>(sent) : -1;
    vec[sent].msg_len = static_cast<unsigned int>(r);
  }
  return static_cast<int>(sent);
}

__attribute__((visibility("default"))) ssize_t recvfrom(int fd, void* buf, size_t n, int flags, struct sockaddr* from,
                                                        socklen_t* from_len) {
  ssize_t got = real_recvfrom(fd, buf, n, flags, from, from_len);
  if (!g_passthrough && !(flags & MSG_PEEK)) AfterReceive(fd, buf, got, from, from_len);
  return got;
}

__attribute__((visibility("default"))) ssize_t recvmsg(int fd, struct msghdr* msg, int flags) {
  ssize_t got = real_recvmsg(fd, msg, flags);
  if (!g_passthrough && got > 0 && msg != nullptr && msg->msg_iovlen >= 1 && !(flags & MSG_PEEK)) {
    socklen_t len = msg->msg_namelen;
    const size_t first = std::min(static_cast<size_t>(got), msg->msg_iov[0].iov_len);
    AfterReceive(fd, msg->msg_iov[0].iov_base, static_cast<ssize_t>(first),
                 static_cast<struct sockaddr*>(msg->msg_name), msg->msg_name ? &len : nullptr);
    msg->msg_namelen = len;
  }
  return got;
}

}  // extern "C"
