#include "common/json.h"

#include <cmath>
#include <cstdlib>

namespace microvm {

namespace {
constexpr size_t kMaxText = 1 << 20;
constexpr int kMaxDepth = 32;
}  // namespace

class JsonParser {
 public:
  explicit JsonParser(const std::string& text) : s_(text) {}

  bool ParseDocument(JsonValue* out, std::string* error) {
    if (s_.size() > kMaxText) return Fail("document larger than 1 MiB", error);
    if (!ParseValue(out, 0, error)) return false;
    SkipSpace();
    if (pos_ != s_.size()) return Fail("trailing characters", error);
    return true;
  }

 private:
  bool Fail(const char* what, std::string* error) {
    *error = std::string("invalid JSON at byte ") + std::to_string(pos_) + ": " + what;
    return false;
  }

  void SkipSpace() {
    while (pos_ < s_.size() && (s_[pos_] == ' ' || s_[pos_] == '\t' || s_[pos_] == '\n' || s_[pos_] == '\r')) {
      pos_++;
    }
  }

  bool Literal(const char* word) {
    size_t n = std::char_traits<char>::length(word);
    if (s_.compare(pos_, n, word) != 0) return false;
    pos_ += n;
    return true;
  }

  bool ParseValue(JsonValue* out, int depth, std::string* error) {
    if (depth > kMaxDepth) return Fail("nesting too deep", error);
    SkipSpace();
    if (pos_ >= s_.size()) return Fail("unexpected end", error);
    char c = s_[pos_];
    if (c == '{') return ParseObject(out, depth, error);
    if (c == '[') return ParseArray(out, depth, error);
    if (c == '"') {
      out->type_ = JsonValue::Type::kString;
      return ParseString(&out->string_, error);
    }
    if (Literal("null")) {
      out->type_ = JsonValue::Type::kNull;
      return true;
    }
    if (Literal("true")) {
      out->type_ = JsonValue::Type::kBool;
      out->bool_ = true;
      return true;
    }
    if (Literal("false")) {
      out->type_ = JsonValue::Type::kBool;
      out->bool_ = false;
      return true;
    }
    if (c == '-' || (c >= '0' && c <= '9')) return ParseNumber(out, error);
    return Fail("unexpected character", error);
  }

  bool ParseNumber(JsonValue* out, std::string* error) {
    size_t start = pos_;
    if (s_[pos_] == '-') pos_++;
    auto digits = [&]() {
      size_t n = 0;
      while (pos_ < s_.size() && s_[pos_] >= '0' && s_[pos_] <= '9') {
        pos_++;
        n++;
      }
      return n;
    };
    if (digits() == 0) return Fail("bad number", error);
    if (pos_ < s_.size() && s_[pos_] == '.') {
      pos_++;
      if (digits() == 0) return Fail("bad number", error);
    }
    if (pos_ < s_.size() && (s_[pos_] == 'e' || s_[pos_] == 'E')) {
      pos_++;
      if (pos_ < s_.size() && (s_[pos_] == '+' || s_[pos_] == '-')) pos_++;
      if (digits() == 0) return Fail("bad number", error);
    }
    std::string text = s_.substr(start, pos_ - start);
    out->type_ = JsonValue::Type::kNumber;
    out->number_ = std::strtod(text.c_str(), nullptr);
    if (!std::isfinite(out->number_)) return Fail("number out of range", error);
    return true;
  }

  static void AppendUtf8(uint32_t cp, std::string* out) {
    if (cp < 0x80) {
      out->push_back(static_cast<char>(cp));
    } else if (cp < 0x800) {
      out->push_back(static_cast<char>(0xC0 | (cp >> 6)));
      out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    } else if (cp < 0x10000) {
      out->push_back(static_cast<char>(0xE0 | (cp >> 12)));
      out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
      out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    } else {
      out->push_back(static_cast<char>(0xF0 | (cp >> 18)));
      out->push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
      out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
      out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    }
  }

  bool Hex4(uint32_t* out) {
    if (pos_ + 4 > s_.size()) return false;
    uint32_t v = 0;
    for (int i = 0; i < 4; i++) {
      char h = s_[pos_++];
      v <<= 4;
      if (h >= '0' && h <= '9')
        v |= h - '0';
      else if (h >= 'a' && h <= 'f')
        v |= h - 'a' + 10;
      else if (h >= 'A' && h <= 'F')
        v |= h - 'A' + 10;
      else
        return false;
    }
    *out = v;
    return true;
  }

  bool ParseString(std::string* out, std::string* error) {
    pos_++;  // opening quote
    while (pos_ < s_.size()) {
      unsigned char c = static_cast<unsigned char>(s_[pos_]);
      if (c == '"') {
        pos_++;
        return true;
      }
      if (c < 0x20) return Fail("control character in string", error);
      if (c != '\\') {
        out->push_back(static_cast<char>(c));
        pos_++;
        continue;
      }
      pos_++;
      if (pos_ >= s_.size()) break;
      char e = s_[pos_++];
      switch (e) {
        case '"':
          out->push_back('"');
          break;
        case '\\':
          out->push_back('\\');
          break;
        case '/':
          out->push_back('/');
          break;
        case 'b':
          out->push_back('\b');
          break;
        case 'f':
          out->push_back('\f');
          break;
        case 'n':
          out->push_back('\n');
          break;
        case 'r':
          out->push_back('\r');
          break;
        case 't':
          out->push_back('\t');
          break;
        case 'u': {
          uint32_t cp;
          if (!Hex4(&cp)) return Fail("bad \\u escape", error);
          if (cp >= 0xD800 && cp <= 0xDBFF) {
            uint32_t lo;
            if (!Literal("\\u") || !Hex4(&lo) || lo < 0xDC00 || lo > 0xDFFF) {
              return Fail("unpaired surrogate", error);
            }
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
          } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
            return Fail("unpaired surrogate", error);
          }
          if (cp == 0) return Fail("NUL in string", error);
          AppendUtf8(cp, out);
          break;
        }
        default:
          return Fail("bad escape", error);
      }
    }
    return Fail("unterminated string", error);
  }

  bool ParseArray(JsonValue* out, int depth, std::string* error) {
    out->type_ = JsonValue::Type::kArray;
    pos_++;
    SkipSpace();
    if (pos_ < s_.size() && s_[pos_] == ']') {
      pos_++;
      return true;
    }
    while (true) {
      out->array_.emplace_back();
      if (!ParseValue(&out->array_.back(), depth + 1, error)) return false;
      SkipSpace();
      if (pos_ >= s_.size()) return Fail("unterminated array", error);
      if (s_[pos_] == ',') {
        pos_++;
        continue;
      }
      if (s_[pos_] == ']') {
        pos_++;
        return true;
      }
      return Fail("expected , or ]", error);
    }
  }

  bool ParseObject(JsonValue* out, int depth, std::string* error) {
    out->type_ = JsonValue::Type::kObject;
    pos_++;
    SkipSpace();
    if (pos_ < s_.size() && s_[pos_] == '}') {
      pos_++;
      return true;
    }
    while (true) {
      SkipSpace();
      if (pos_ >= s_.size() || s_[pos_] != '"') return Fail("expected a key", error);
      std::string key;
      if (!ParseString(&key, error)) return false;
      SkipSpace();
      if (pos_ >= s_.size() || s_[pos_] != ':') return Fail("expected :", error);
      pos_++;
      if (out->object_.count(key)) return Fail("duplicate key", error);
      if (!ParseValue(&out->object_[key], depth + 1, error)) return false;
      SkipSpace();
      if (pos_ >= s_.size()) return Fail("unterminated object", error);
      if (s_[pos_] == ',') {
        pos_++;
        continue;
      }
      if (s_[pos_] == '}') {
        pos_++;
        return true;
      }
      return Fail("expected , or }", error);
    }
  }

  const std::string& s_;
  size_t pos_ = 0;
};

const JsonValue* JsonValue::Get(const std::string& key) const {
  if (type_ != Type::kObject) return nullptr;
  auto it = object_.find(key);
  return it == object_.end() ? nullptr : &it->second;
}

bool JsonValue::Parse(const std::string& text, JsonValue* out, std::string* error) {
  *out = JsonValue();
  JsonParser parser(text);
  return parser.ParseDocument(out, error);
}

void JsonQuote(const std::string& s, std::string* out) {
  static const char kHex[] = "0123456789abcdef";
  out->push_back('"');
  for (unsigned char c : s) {
    switch (c) {
      case '"':
        out->append("\\\"");
        break;
      case '\\':
        out->append("\\\\");
        break;
      case '\n':
        out->append("\\n");
        break;
      case '\r':
        out->append("\\r");
        break;
      case '\t':
        out->append("\\t");
        break;
      default:
        if (c < 0x20) {
          out->append("\\u00");
          out->push_back(kHex[c >> 4]);
          out->push_back(kHex[c & 0xF]);
        } else {
          out->push_back(static_cast<char>(c));
        }
    }
  }
  out->push_back('"');
}

}  // namespace microvm
