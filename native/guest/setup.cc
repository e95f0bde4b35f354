// microvm-guest-init's setup: the base mounts, the network, the config and the shares.
#include <arpa/inet.h>
#include <dirent.h>
#include <fcntl.h>
#include <net/if.h>
#include <net/route.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <linux/vm_sockets.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "common/json.h"
#include "guest/init_parts.h"
#include "guest/protocol.h"

namespace microvm {
namespace init {

void Log(const std::string& msg) {
  std::string line = std::string(guest::kConsolePrefix) + msg + "\n";
  ssize_t ignored = write(STDERR_FILENO, line.data(), line.size());
  (void)ignored;
}

namespace {

void MountFs(const char* source, const char* target, const char* type, unsigned long flags, const char* data) {
  mkdir(target, 0755);
  if (mount(source, target, type, flags, data) != 0 && errno != EBUSY) {
    Log(std::string("mount ") + target + ": " + std::strerror(errno));
  }
}

bool SetFlags(int sock, const char* ifname, short flags) {
  struct ifreq ifr;
  std::memset(&ifr, 0, sizeof ifr);
  std::snprintf(ifr.ifr_name, IFNAMSIZ, "%s", ifname);
  if (ioctl(sock, SIOCGIFFLAGS, &ifr) != 0) return false;
  ifr.ifr_flags |= flags;
  return ioctl(sock, SIOCSIFFLAGS, &ifr) == 0;
}

bool SetAddr(int sock, const char* ifname, unsigned long request, const char* addr) {
  struct ifreq ifr;
  std::memset(&ifr, 0, sizeof ifr);
  std::snprintf(ifr.ifr_name, IFNAMSIZ, "%s", ifname);
  auto* sin = reinterpret_cast<struct sockaddr_in*>(&ifr.ifr_addr);
  sin->sin_family = AF_INET;
  inet_pton(AF_INET, addr, &sin->sin_addr);
  return ioctl(sock, request, &ifr) == 0;
}

void MkdirP(const std::string& path) {
  for (size_t i = 1; i <= path.size(); i++) {
    if (i == path.size() || path[i] == '/') mkdir(path.substr(0, i).c_str(), 0755);
  }
}

// An egress allow-list's names at their virtual addresses ([[ip, name], ...], lib/network/egress.ts),
// appended to /etc/hosts. Only characters a host name or an IPv4 address has; the rest is skipped.
void AddHosts(const JsonValue* hosts) {
  if (hosts == nullptr || !hosts->is_array() || hosts->array_items().empty()) return;
  auto only = [](const std::string& s, const char* allowed) {
    return !s.empty() && s.size() <= 253 && s.find_first_not_of(allowed) == std::string::npos;
  };
  std::string lines;
  for (const auto& h : hosts->array_items()) {
    if (!h.is_array() || h.array_items().size() != 2 || !h.array_items()[0].is_string() ||
        !h.array_items()[1].is_string())
      continue;
    const std::string& ip = h.array_items()[0].string_value();
    const std::string& name = h.array_items()[1].string_value();
    if (!only(ip, "0123456789.") || !only(name, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-"))
      continue;
    lines += ip + " " + name + "\n";
  }
  mkdir("/etc", 0755);
  int fd = open("/etc/hosts", O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC | O_NOFOLLOW, 0644);
  if (fd < 0) {
    Log(std::string("/etc/hosts: ") + std::strerror(errno));
    return;
  }
  ssize_t ignored = write(fd, lines.data(), lines.size());
  (void)ignored;
  close(fd);
}

}  // namespace

void MountBasics() {
  MountFs("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, nullptr);
  MountFs("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, nullptr);
  MountFs("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755");
  MountFs("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "gid=5,mode=620,ptmxmode=666");
  MountFs("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777");
  MountFs("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755");
}

void Network() {
  int sock = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (sock < 0) return;
  SetFlags(sock, "lo", IFF_UP);
  if (SetAddr(sock, "eth0", SIOCSIFADDR, "10.0.2.15") && SetAddr(sock, "eth0", SIOCSIFNETMASK, "255.255.255.0") &&
      SetFlags(sock, "eth0", IFF_UP | IFF_RUNNING)) {
    struct rtentry rt;
    std::memset(&rt, 0, sizeof rt);
    auto* gw = reinterpret_cast<struct sockaddr_in*>(&rt.rt_gateway);
    gw->sin_family = AF_INET;
    inet_pton(AF_INET, "10.0.2.2", &gw->sin_addr);
    reinterpret_cast<struct sockaddr_in*>(&rt.rt_dst)->sin_family = AF_INET;
    reinterpret_cast<struct sockaddr_in*>(&rt.rt_genmask)->sin_family = AF_INET;
    rt.rt_flags = RTF_UP | RTF_GATEWAY;
    char dev[] = "eth0";
    rt.rt_dev = dev;
    if (ioctl(sock, SIOCADDRT, &rt) != 0 && errno != EEXIST) Log(std::string("default route: ") + std::strerror(errno));
  }
  close(sock);
}

bool GuestConfig::Provides(const char* port) const {
  for (const auto& p : ports) {
    if (p == port) return true;
  }
  return false;
}

bool GuestConfig::Idle() const {
  return cmd.size() == 2 && cmd[0] == guest::kInitPath && cmd[1] == guest::kArgIdle;
}

// Reads the config (and appends its host names to /etc/hosts); false, logged, when it cannot.
bool ReadConfig(GuestConfig* config) {
  std::vector<std::string>* cmd = &config->cmd;
  std::vector<ShareMount>* mounts = &config->mounts;
  const char* path = getenv("KRUN_CONFIG");
  if (path == nullptr) path = guest::kConfigPath;
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    Log(std::string("cannot open ") + path + ": " + std::strerror(errno));
    return false;
  }
  std::string text;
  char buf[8192];
  ssize_t n;
  while ((n = read(fd, buf, sizeof buf)) > 0) text.append(buf, static_cast<size_t>(n));
  close(fd);
  JsonValue json;
  std::string error;
  if (!JsonValue::Parse(text, &json, &error)) {
    Log(std::string(path) + ": " + error);
    return false;
  }
  auto strings = [](const JsonValue* v, std::vector<std::string>* out) {
    if (v == nullptr || !v->is_array()) return;
    for (const auto& item : v->array_items()) {
      if (item.is_string()) out->push_back(item.string_value());
    }
  };
  strings(json.Get(guest::kConfigCmd), cmd);
  strings(json.Get(guest::kConfigEnv), &config->env);
  strings(json.Get(guest::kConfigPorts), &config->ports);
  AddHosts(json.Get(guest::kConfigHosts));
  const JsonValue* ms = json.Get(guest::kConfigMounts);
  if (ms != nullptr && ms->is_array()) {
    for (const auto& m : ms->array_items()) {
      const JsonValue* tag = m.Get("tag");
      const JsonValue* target = m.Get("target");
      const JsonValue* ro = m.Get("readOnly");
      if (tag == nullptr || target == nullptr || !tag->is_string() || !target->is_string() ||
          target->string_value().empty() || target->string_value()[0] != '/') {
        continue;
      }
      mounts->push_back(
          {tag->string_value(), target->string_value(), ro != nullptr && ro->is_bool() && ro->bool_value()});
    }
  }
  const JsonValue* user = json.Get(guest::kConfigUser);
  if (user != nullptr && user->is_string()) config->user = user->string_value();
  const JsonValue* wd = json.Get(guest::kConfigWorkingDir);
  if (wd != nullptr && wd->is_string() && !wd->string_value().empty()) config->workdir = wd->string_value();
  if (cmd->empty()) {
    Log(std::string(path) + ": no Cmd");
    return false;
  }
  return true;
}

bool MountShares(const GuestConfig& config) {
  for (const auto& m : config.mounts) {
    MkdirP(m.target);
    if (mount(m.tag.c_str(), m.target.c_str(), "virtiofs", m.read_only ? MS_RDONLY : 0, nullptr) != 0) {
      Log("mount " + m.tag + " on " + m.target + ": " + std::strerror(errno));
      return false;
    }
  }
  return true;
}

}  // namespace init
}  // namespace microvm
