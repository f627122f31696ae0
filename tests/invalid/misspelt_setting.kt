# misspelt_setting.kt: a train setting with a typo
# expect: E205
graph misspelt_setting
data digits { val_split = 300 }
train {
  epoch = 8
}
node a : cnn_tiny [target]
label -> a : through
