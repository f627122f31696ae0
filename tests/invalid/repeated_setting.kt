# repeated_setting.kt: one setting given twice
# expect: E407
graph repeated_setting
data digits { val_split = 300 }
train {
  epochs = 8
  epochs = 10
}
node a : cnn_tiny [target]
label -> a : through
